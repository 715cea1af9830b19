"""The engine's configuration: one dataclass, a docstring per field."""

from __future__ import annotations

from dataclasses import dataclass

from loraswap.server.engine.admission import AdmissionConfig
from loraswap.server.lora.ops import OPS

QUANTIZATIONS = ("nf4", "int8", "fp16w", "bf16", "fp16", "fp32")
LORA_OPS = ("auto", *OPS)


@dataclass
class EngineConfig:
    """Everything the multi-LoRA engine needs to start.

    Attributes:
        base: ``default`` (embedded SmolLM2-135M-Instruct) or a local HF Llama-family folder.
        registry: Registry URL (``file:///…``, ``s3://bucket/prefix``); None = ``$LORASWAP_REGISTRY`` or
            the local default.
        quantization: ``nf4`` / ``int8`` (bitsandbytes) / ``fp16w`` / ``bf16`` / ``fp16`` / ``fp32``;
            None picks ``nf4`` on CUDA (computing in bf16 from Ampere on, fp16 before) and, on CPU,
            ``bf16`` where the CPU runs it natively (AVX512_BF16 or AMX), else ``fp32``
            (``loraswap.precision``; NF4 on CPU is opt-in). ``fp16w`` (CPU, x86 with AVX2: fbgemm's fp16
            matmul) holds the linear weights in fp16 and multiplies them in fp32 (``engine/weight_only.py``):
            on a CPU without native bf16, half of ``fp32``'s bytes per linear weight and faster than
            ``fp32`` (SmolLM2 on a 2-core AVX2 EPYC: 365 vs 621 MiB of weights, 1.2x the tokens/s;
            ``bench/quantized_cpu.py``); exact for a bf16 checkpoint but for weights under 2**-17.
        device: ``cuda``, ``cuda:N`` or ``cpu``; None picks CUDA when available.
        adapter_slots: Adapters resident on the device at once (one forward pass mixes at most this many);
            0 serves the base alone with no LoRA layers (how a route serves a merged model).
        max_rank: Largest LoRA rank accepted; slot buffers are sized for it.
        max_batch_size: Sequences decoded together (also the number of KV-cache rows).
        max_seq_len: Prompt + generated tokens per sequence (KV-cache length).
        max_queue: Requests waiting for admission; past it ``submit`` raises OverloadedError.
        prefill_chunk: Prompt tokens prefilled per step, shared by all prefilling sequences, so running
            decodes are never stalled by a long prompt.
        prefill_policy: ``separate``: prefill steps and decode steps take turns, so a new request's first
            token waits for at most one step and running decodes for at most one bounded prefill step;
            ``mixed``: prefill chunks ride along with every decode step (fewer steps, later first tokens).
        prefill_between_layers: With ``separate``: a request that arrives while a decode step runs (or
            a prompt the alternation left for later) has its prefill run between two decoder layers of
            that step, after which the paused step finishes; its first token does not wait for the
            step in flight. At most one such prefill (``prefill_chunk`` tokens) per decode step.
        host_cache_bytes: Byte budget of adapters kept in host RAM (LRU). An adapter whose file is in
            the slot dtype is held as a private mapping of its disk-cache file and counts its file
            size; others hold converted copies.
        tag_ttl_s: Seconds a resolved tag → digest mapping is trusted before asking the registry again.
        tag_stale_grace_s: When the registry cannot be reached, seconds after its last answer for a tag
            that the version it named keeps serving (asked again once per ``tag_ttl_s``; counted in
            ``loraswap_registry_stale_resolutions_total``, the first of an outage logged), so an outage
            does not stop adapters already served. 0: fail as soon as the tag cannot be re-resolved.
            A digest reference whose version is in the disk cache never needs the registry.
        tag_refresh_wait_s: How long a request waits for the registry to re-resolve a tag whose last
            answer is within ``tag_stale_grace_s`` before that answer is served (the look-up goes on,
            and its answer is used once it comes): a registry that accepts connections and does not
            answer delays a served tag by this much, not by the S3 client's timeouts.
        max_step_failures: Consecutive failed steps (each fails the requests in its batch) after which
            the engine gives up: every request is failed UNAVAILABLE, health turns NOT_SERVING and
            ``loraswap serve`` exits non-zero so that its supervisor restarts it.
        load_workers: Threads that fetch and parse adapters in the background.
        lora_op: ``auto`` (pick per batch), ``grouped`` (bmm over slot-buffer views), ``bgmv`` (gather +
            bmm), ``sgmv`` (per-segment matmul) or ``reference`` (per-token loop, for tests).
        fuse_projections: Run each layer's q/k/v projections as one matmul and gate/up as one, over
            the same weights (each projection's weight a view of the fused one, or one packed tensor
            with ``pack_weights``; the group's LoRA shrinks as one matmul, the expands per projection);
            plain unquantized bases only. ``false`` runs them one by one (the reference).
        pack_weights: On CPU (bf16 where the CPU supports it, fp32), reorder each plain base projection's
            weight once into oneDNN's layout (``engine/packed.py``) instead of on every matmul; the
            packed weight replaces the plain one (a fused group's too). A tied ``lm_head`` is packed as
            well and keeps the embedding's plain weight beside it: one extra copy of the vocabulary
            matrix. Quantized bases and other devices are left alone; ``false`` runs ``F.linear`` on
            the plain weights (the reference).
        admission_policy: ``adapter-aware``: when more distinct adapters wait than there are slots,
            requests whose adapters are resident are admitted ahead of those that need a slot (so the
            batch stays full), the slot given up is the idle one with the fewest waiters, and every
            wait is bounded (below); ``fifo``: arrival order, the first request that finds every slot
            busy holds up all behind it.
        admission_max_skips: With ``adapter-aware``: times a request may be passed over before it goes
            first and a slot is drained for it.
        admission_max_wait_rounds: With ``adapter-aware``: admission rounds (one per step, one more per
            prefill between layers) a request may wait before it goes first and a slot is drained for it.
        step_threads: CPU threads the step loop's torch ops use (:meth:`Engine.start`'s thread); None:
            torch's setting. Each step thread that runs ops in parallel keeps an OpenMP team, and two
            teams on the same cores slow every op of both (``loraswap.device.serial_torch_thread``), so
            a route's engine beside the shared one runs with 1 on CPU.
    """

    base: str = "default"
    registry: str | None = None
    quantization: str | None = None
    device: str | None = None
    adapter_slots: int = 32
    max_rank: int = 64
    max_batch_size: int = 32
    max_seq_len: int = 1024
    max_queue: int = 256
    prefill_chunk: int = 512
    prefill_policy: str = "separate"
    prefill_between_layers: bool = True
    host_cache_bytes: int = 2 << 30
    tag_ttl_s: float = 5.0
    tag_stale_grace_s: float = 3600.0
    tag_refresh_wait_s: float = 1.0
    max_step_failures: int = 3
    load_workers: int = 2
    lora_op: str = "auto"
    fuse_projections: bool = True
    pack_weights: bool = True
    admission_policy: str = "adapter-aware"
    admission_max_skips: int = 4
    admission_max_wait_rounds: int = 32
    step_threads: int | None = None

    def admission(self) -> AdmissionConfig:
        """The admission policy's configuration."""
        return AdmissionConfig(
            self.admission_policy, self.admission_max_skips, self.admission_max_wait_rounds
        )

    def problems(self) -> list[str]:
        out = []
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            out.append(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.adapter_slots < 0:
            out.append(f"adapter_slots must be >= 0, got {self.adapter_slots}")
        if self.step_threads is not None and self.step_threads < 1:
            out.append(f"step_threads must be >= 1, got {self.step_threads}")
        for name in ("max_rank", "max_batch_size", "max_seq_len", "prefill_chunk"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_step_failures < 1:
            out.append(f"max_step_failures must be >= 1, got {self.max_step_failures}")
        if min(self.tag_ttl_s, self.tag_stale_grace_s, self.tag_refresh_wait_s) < 0:
            out.append("tag_ttl_s, tag_stale_grace_s and tag_refresh_wait_s must be >= 0")
        if self.max_queue < 0:
            out.append(f"max_queue must be >= 0, got {self.max_queue}")
        if self.prefill_policy not in ("separate", "mixed"):
            out.append(f"prefill_policy must be separate or mixed, got {self.prefill_policy!r}")
        if self.lora_op not in LORA_OPS:
            out.append(f"lora_op must be one of {LORA_OPS}, got {self.lora_op!r}")
        out += self.admission().problems()
        return out
