"""loraswap: adapter registry and hot-swap multi-LoRA inference server."""

__version__ = "0.1.0"
