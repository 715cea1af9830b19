"""One forward pass over a packed, ragged batch: decode tokens of many sequences plus prefill chunks.

All tokens of the step are concatenated (``[T, hidden]``), so every projection — and its LoRA delta,
driven by the per-token slot index — runs once for the whole batch. Attention is the only per-sequence
part: decode tokens share one masked SDPA call, each prefill chunk gets its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraswap.server.engine.fused import fuse_layer
from loraswap.server.engine.kv_cache import KVCache, head_dim, kv_heads
from loraswap.server.engine.packed import pack_base
from loraswap.server.lora.context import LoraContext


@dataclass
class SeqChunk:
    """One sequence's share of a step.

    Attributes:
        row: The sequence's KV-cache row.
        token_ids: Tokens to run (1 for decode, a prompt chunk for prefill).
        start_pos: Position of the first of them (= tokens already cached for the sequence).
        slot: Adapter slot, or -1 for the base model.
        want_logits: Whether the logits of the last token are needed (decode, or a prompt's last chunk).
    """

    row: int
    token_ids: list[int]
    start_pos: int
    slot: int
    want_logits: bool


@dataclass
class _Batch:
    """Index tensors shared by all layers of one step (decode chunks first, then prefill chunks).

    Decode attention reads the KV rows ``span`` (first, end) as a view when the decode rows are compact
    (the span at most twice their count); ``decode_index`` then places each decode token in the span
    and ``decode_mask`` has one line per span row. Otherwise ``span`` is None, the rows are gathered
    and the mask has one line per decode token.
    """

    rows: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    num_decode: int
    decode_mask: torch.Tensor | None  # [Bd or span, Ld] bool
    decode_len: int
    prefill: list[tuple[int, int, int, int]]  # (token start, token end, row, start_pos)
    span: tuple[int, int] | None = None
    decode_index: torch.Tensor | None = None  # [Bd] row - span start


def chunk_order(chunk: SeqChunk) -> tuple[bool, int]:
    """Decode chunks first (they share one attention call), grouped by adapter slot (LoRA ops run on
    contiguous tokens per slot)."""
    return len(chunk.token_ids) > 1, chunk.slot


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PackedForward:
    """Runs a Llama-family HF model's modules over packed batches with an external KV cache."""

    def __init__(
        self,
        model: nn.Module,
        kv: KVCache,
        lora: LoraContext,
        ranks: dict[int, int],
        mode: str,
        fuse_projections: bool = True,
        pack_weights: bool = True,
    ) -> None:
        self.model = model
        self.inner = model.model
        self.kv = kv
        self.lora = lora
        self.ranks = ranks  # slot -> rank of the adapter in it (kept current by the slot manager)
        self.mode = mode
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = kv_heads(config)
        self.head_dim = head_dim(config)
        self.device = next(model.parameters()).device
        n = len(self.inner.layers)
        # Per layer: q/k/v and gate/up as one matmul each where the bases allow (engine/fused.py);
        # None runs the projections one by one, the reference path.
        hint = kv.k[0].shape[0] if pack_weights and kv.k else None  # packed for a full batch of rows
        self.fused = [(None, None)] * n
        if fuse_projections:
            self.fused = [fuse_layer(layer, hint) for layer in self.inner.layers]
        if hint is not None:
            self._pack_projections(hint)

    def _pack_projections(self, batch_hint: int) -> None:
        """Every plain CPU base projection the forward calls that is not already in a packed fused group,
        packed (engine/packed.py), ``lm_head`` included: a tied one keeps the embedding's plain weight
        beside its packed copy (one extra copy of the vocabulary matrix, for a faster logits matmul)."""
        for layer in self.inner.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                pack_base(layer.self_attn, name, batch_hint)
            if hasattr(layer.mlp, "act_fn"):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    pack_base(layer.mlp, name, batch_hint)
        pack_base(self.model, "lm_head", batch_hint)

    @torch.inference_mode()
    def __call__(
        self, chunks: list[SeqChunk], between_layers: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """Run one step; return logits ``[n, vocab]`` (fp32) for chunks with ``want_logits``, in order.

        ``between_layers`` is called before every decoder layer but the first; it may run another
        forward (over other KV rows) before this one goes on.
        """
        chunks = sorted(chunks, key=chunk_order)  # decode chunks first, by slot
        batch, ids, slot_list, want = self._pack(chunks)
        outer = self.lora.snapshot()
        self.lora.set_batch(slot_list, self.ranks, self.device, self.mode)
        try:
            hidden = self.inner.embed_tokens(ids)  # [T, hidden]
            cos, sin = self.inner.rotary_emb(hidden[None], batch.positions[None])
            cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, D]
            for index, layer in enumerate(self.inner.layers):
                if between_layers is not None and index:
                    mine = self.lora.snapshot()
                    between_layers()
                    self.lora.restore(mine)
                attn_in = layer.input_layernorm(hidden)
                hidden = hidden + self._attention(layer.self_attn, attn_in, index, batch, cos, sin)
                hidden = hidden + self._mlp(layer.mlp, layer.post_attention_layernorm(hidden), index)
            last = self.inner.norm(hidden[want])
            return self.model.lm_head(last).float()
        finally:
            self.lora.restore(outer)

    def _pack(self, chunks: list[SeqChunk]) -> tuple[_Batch, torch.Tensor, list[int], torch.Tensor]:
        ids: list[int] = []
        rows: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        want: list[int] = []
        prefill = []
        for chunk in chunks:
            n = len(chunk.token_ids)
            start = len(ids)
            ids += chunk.token_ids
            rows += [chunk.row] * n
            positions += range(chunk.start_pos, chunk.start_pos + n)
            slots += [chunk.slot] * n
            if chunk.want_logits:
                want.append(len(ids) - 1)
            if n > 1:
                prefill.append((start, start + n, chunk.row, chunk.start_pos))
        num_decode = sum(1 for c in chunks if len(c.token_ids) == 1)
        dev = self.device
        batch = _Batch(
            rows=torch.tensor(rows, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            num_decode=num_decode,
            decode_mask=None,
            decode_len=0,
            prefill=prefill,
        )
        if num_decode:
            self._decode_layout(batch, rows[:num_decode], positions[:num_decode])
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        return batch, ids_t, slots, torch.tensor(want, dtype=torch.long, device=dev)

    def _decode_layout(self, batch: _Batch, rows: list[int], positions: list[int]) -> None:
        """Span or gather for decode attention, and the matching mask (see :class:`_Batch`)."""
        batch.decode_len = max(positions) + 1
        first, end = min(rows), max(rows) + 1
        if end - first <= 2 * len(rows):
            last_pos = [0] * (end - first)  # rows of the span outside the batch attend to key 0 only
            for row, pos in zip(rows, positions, strict=True):
                last_pos[row - first] = pos
            batch.span = (first, end)
            batch.decode_index = torch.tensor([r - first for r in rows], dtype=torch.long, device=self.device)
        else:
            last_pos = positions
        keys = torch.arange(batch.decode_len, device=self.device)
        batch.decode_mask = keys[None, :] <= torch.tensor(last_pos, device=self.device)[:, None]

    def _mlp(self, mlp: nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
        gate_up = self.fused[layer][1]
        if gate_up is None:
            return mlp(x)
        gate, up = gate_up(x)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def _attention(
        self,
        attn: nn.Module,
        x: torch.Tensor,
        layer: int,
        batch: _Batch,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.fused[layer][0]
        q, k, v = qkv(x) if qkv is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = self.kv.k[layer], self.kv.v[layer]  # [rows, KVH, L, D]
        k_cache.transpose(1, 2).index_put_((batch.rows, batch.positions), k.to(k_cache.dtype))
        v_cache.transpose(1, 2).index_put_((batch.rows, batch.positions), v.to(v_cache.dtype))
        parts = []
        if batch.num_decode:
            parts.append(self._decode_attention(q[: batch.num_decode], k_cache, v_cache, batch))
        for start, end, row, pos in batch.prefill:
            parts.append(self._prefill_attention(q[start:end], k_cache[row], v_cache[row], pos))
        out = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]  # [T, H, D]
        return attn.o_proj(out.reshape(t, self.num_heads * self.head_dim))

    def _decode_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: _Batch
    ) -> torch.Tensor:
        """One query per sequence against its cached keys: two batched matmuls over a view of the KV
        rows (or a gather of them), softmax in fp32 (on CPU it beats SDPA over a gathered
        cache: ``bench/RESULTS.md``, "decode attention")."""
        length = batch.decode_len
        if batch.span is not None:
            first, end = batch.span
            keys, values = k_cache[first:end, :, :length], v_cache[first:end, :, :length]
            query = q.new_zeros(end - first, *q.shape[1:]).index_copy_(0, batch.decode_index, q)
        else:
            rows = batch.rows[: batch.num_decode]
            keys, values, query = k_cache[rows, :, :length], v_cache[rows, :, :length], q
        n, kv_heads = query.shape[0], keys.shape[1]
        grouped = query.to(keys.dtype).view(n, kv_heads, self.num_heads // kv_heads, self.head_dim)
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * self.head_dim**-0.5
        scores.masked_fill_(~batch.decode_mask[:, None, None, :], float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)  # [n, KVH, G, D]
        out = out.view(n, self.num_heads, self.head_dim).to(q.dtype)
        return out if batch.span is None else out.index_select(0, batch.decode_index)

    def _prefill_attention(
        self, q: torch.Tensor, k_row: torch.Tensor, v_row: torch.Tensor, start_pos: int
    ) -> torch.Tensor:
        n = q.shape[0]
        total = start_pos + n
        keys = k_row[:, :total][None]  # [1, KVH, total, D]
        values = v_row[:, :total][None]
        query = q.transpose(0, 1)[None].to(keys.dtype)  # [1, H, n, D]
        if start_pos == 0:
            out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True)
        else:
            allowed = torch.arange(total, device=q.device)[None, :] <= (
                start_pos + torch.arange(n, device=q.device)[:, None]
            )
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, enable_gqa=True)
        return out[0].transpose(0, 1).to(q.dtype)  # [n, H, D]
