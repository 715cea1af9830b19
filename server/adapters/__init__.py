"""The adapter tiers: registry → local disk cache → host RAM → device slot.

``manager``: :class:`AdapterManager` (resolving references, loads on worker threads, the tiers'
bookkeeping, and which thread and lock may touch what); ``slots``: which adapter is in which device
slot; ``host_cache``: the host-RAM tier; ``lru``: the least-recently-used map they share; ``reader``:
an adapter folder read and checked against the base; ``safetensors_buffer``: the mapped safetensors
reader.

May import :mod:`loraswap.server.lora` (to fill slots), :mod:`loraswap.registry` (the disk tier is the
registry's pull cache) and the engine's public data types (``engine.api``); never the Engine or gRPC.
"""
