"""loraswap and vLLM's CPU build side by side on one machine (``python -m bench.peer``)."""
