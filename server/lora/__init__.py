"""Batched multi-LoRA compute: the layer that wraps a base projection, its slot buffers, the ops.

``layer``: :class:`BatchedLoraLinear` owns its slot buffers ``A: [slots, max_rank, in]`` and
``Bᵀ: [slots, max_rank, out]`` and fills them; ``context``: the per-step state every layer reads and
the choice of op; ``ops``: the ops, each an object with one ``apply``, a reference op beside the fast ones.

Imports only torch (and :mod:`loraswap.adapter_format` for the targetable module names).
"""
