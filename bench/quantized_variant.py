"""One variant of ``bench/quantized_cpu.py`` in one fresh process: the engine's memory after load, its
decode throughput, and its greedy tokens beside PEFT's.

Run by the bench as ``python -m bench.quantized_variant --spec SPEC.json --out RESULT.json``; the spec
names the variant, the base, the registry holding the adapters and the workload.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.engine_bench import requests, throughput
from bench.int8_weight_only import Int8WeightOnlyLinear
from loraswap.cli import quiet_third_party_notices
from loraswap.device import host_rss_bytes, serial_torch_thread, set_thread_torch_threads
from loraswap.models import BaseModelRef
from loraswap.server.engine.base_loader import LoadedBase, load_base
from loraswap.server.engine.weight_only import HalfWeightLinear, replace_linears
from loraswap.server.lora.layer import BatchedLoraLinear


@dataclass(frozen=True)
class Variant:
    """A way to hold the base.

    Attributes:
        quantization: The engine's ``quantization`` it loads with.
        about: What it is, in a few words (the table's legend).
        candidate: A bench-only weight format applied after loading (``int8wo``), or None.
    """

    quantization: str
    about: str
    candidate: str | None = None


VARIANTS = {
    "fp32": Variant("fp32", "fp32 weights and matmuls (oneDNN-packed)"),
    "bf16": Variant("bf16", "bf16 weights and matmuls (oneDNN-packed where supported)"),
    "int8": Variant("int8", "bitsandbytes LLM.int8 (its CPU backend)"),
    "nf4": Variant("nf4", "bitsandbytes NF4, double quantization, fp32 compute"),
    "int8wo": Variant(
        "fp32", "int8 weight-only, per-row scales, aten._weight_int8pack_mm on bf16 activations", "int8wo"
    ),
    "fp16w": Variant("fp16w", "fp16 weights, fp32 matmuls (fbgemm; engine/weight_only.py)"),
}
"""Every variant the bench knows, in the table's order."""


@dataclass(frozen=True)
class Spec:
    """What one variant process runs (written by the bench as JSON).

    Attributes:
        variant: A :data:`VARIANTS` key.
        base: The base folder.
        registry: The registry folder holding ``adapters``.
        adapters: Adapter names and their PEFT folders (the first ``requests`` make the mixed case).
        requests: Concurrent requests per throughput case.
        new_tokens: Tokens each request generates (EOS ignored).
        agreement: ``(adapter, prompt)`` pairs whose greedy tokens are compared with PEFT's ("" = base);
            empty: no comparison this round.
        threads: Torch CPU threads of the engine's step loop (None: torch's setting).
    """

    variant: str
    base: str
    registry: str
    adapters: dict[str, str]
    requests: int
    new_tokens: int
    agreement: list[tuple[str, str]]
    threads: int | None = None


def memory_reading() -> dict[str, int]:
    """This process's resident set size now and at its peak (``VmHWM``), in bytes."""
    peak = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return {"rss_bytes": host_rss_bytes(), "peak_rss_bytes": peak}


def weight_bytes(model: nn.Module) -> int:
    """Bytes the base's weights hold: every parameter and buffer once (LoRA slot buffers left out), the
    bitsandbytes quantization states beside their weights, and fbgemm's opaque fp16 weights as their
    modules count them. Reads no ``state_dict`` (which bitsandbytes 0.50.2 can corrupt a live 4-bit
    base with, on CPUs with avx512_bf16)."""
    lora = {id(t) for m in model.modules() if isinstance(m, BatchedLoraLinear) for t in (m.a, m.bt)}
    seen: set[int] = set()
    total = 0

    def count(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or id(t) in lora:
            return
        key = id(t) if t.is_mkldnn else t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for t in (*model.parameters(), *model.buffers()):
        count(t)
    for module in model.modules():
        if hasattr(module, "weight_bytes"):
            total += module.weight_bytes()
        weight = getattr(module, "_parameters", {}).get("weight")
        state = getattr(weight, "quant_state", None)  # bitsandbytes 4-bit
        if state is not None:
            for t in (state.absmax, state.code, getattr(state, "offset", None)):
                count(t)
            if state.state2 is not None:
                count(state.state2.absmax)
                count(state.state2.code)
        count(getattr(weight, "SCB", None))  # bitsandbytes 8-bit row scales
    return total


def load_int8wo(ref: BaseModelRef, quantization: str | None, device: torch.device) -> LoadedBase:
    """``load_base`` for the int8 weight-only candidate: fp32, then every plain linear layer (lm_head too)
    turned into an :class:`Int8WeightOnlyLinear` on bf16 activations."""
    loaded = load_base(ref, "fp32", device)
    replace_linears(loaded.model, functools.partial(Int8WeightOnlyLinear.replacing, act_dtype=torch.bfloat16))
    precision = dataclasses.replace(loaded.precision, reason="int8 weights, bf16 activations in the matmul")
    return dataclasses.replace(loaded, quantization="int8wo", precision=precision)


def make_engine(spec: Spec):
    """The engine over ``spec``'s base and registry, with the variant's weights."""
    import loraswap.server.engine.engine as engine_module
    from loraswap.registry import open_registry
    from loraswap.server.engine import Engine, EngineConfig

    variant = VARIANTS[spec.variant]
    n = spec.requests
    config = EngineConfig(
        base=spec.base, quantization=variant.quantization, adapter_slots=n, max_rank=16, max_batch_size=n,
        max_seq_len=256, max_queue=4 * n, step_threads=spec.threads,
    )  # fmt: skip
    if variant.candidate == "int8wo":  # bench-only: the engine loads through this process's load_int8wo
        engine_module.load_base = load_int8wo
    return Engine(config, registry=open_registry(spec.registry))


def engine_tokens(engine, pairs: list[tuple[str, str]], new_tokens: int) -> list[list[int]]:
    """The engine's greedy tokens for every ``(adapter, prompt)`` pair, submitted together."""
    from loraswap.server.engine.api import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    handles = [engine.submit(GenerationRequest(adapter=a, prompt=p, sampling=params)) for a, p in pairs]
    return [list(h.result(timeout=1800).token_ids) for h in handles]


def oracle_model(spec: Spec, engine_model: nn.Module) -> nn.Module:
    """The HF model PEFT runs for ``spec.variant``: loaded the same way (plain dtype, or bitsandbytes with
    the engine's config); for a weight format loraswap applies itself, fp32 with every replaced layer's
    weight set to the one its matmul multiplies by (dequantized), a tied ``lm_head`` untied."""
    from transformers import AutoModelForCausalLM

    from loraswap.models.quantization import bnb_config
    from loraswap.precision import DTYPES
    from loraswap.server.engine.base_loader import compute_dtype

    quantization = VARIANTS[spec.variant].quantization
    dtype = compute_dtype(quantization, torch.device("cpu"))
    if quantization in ("nf4", "int8"):
        config = bnb_config(quantization, dtype)
        return AutoModelForCausalLM.from_pretrained(
            spec.base, dtype=dtype, quantization_config=config, device_map={"": "cpu"}
        )
    model = AutoModelForCausalLM.from_pretrained(spec.base, dtype=DTYPES.get(quantization, dtype))
    for name, module in engine_model.named_modules():
        if isinstance(module, (HalfWeightLinear, Int8WeightOnlyLinear)):  # a LoRA layer's base is `.base`
            target = model.get_submodule(name.removesuffix(".base"))
            target.weight = nn.Parameter(module.weight.to(target.weight.dtype), requires_grad=False)
    return model.eval()


def peft_tokens(spec: Spec, engine_model: nn.Module, tokenizer) -> list[list[int]]:
    """PEFT's greedy tokens for ``spec.agreement``, one sequence at a time, on :func:`oracle_model`."""
    from peft import PeftModel

    names = sorted({a for a, _ in spec.agreement if a})
    model = oracle_model(spec, engine_model)
    if names:
        model = PeftModel.from_pretrained(model, spec.adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(spec.adapters[name], adapter_name=name)
    out = []
    for adapter, prompt in spec.agreement:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        if adapter:
            model.set_adapter(adapter)
        context = model.disable_adapter() if names and not adapter else nullcontext()
        with context, torch.inference_mode():
            generated = model.generate(
                ids, max_new_tokens=spec.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        out.append(generated[0, ids.shape[1] :].tolist())
    return out


def run(spec: Spec) -> dict:
    """Everything measured for one variant (see the module docstring)."""
    before = memory_reading()
    started = time.perf_counter()
    engine = make_engine(spec)
    engine.start()
    result: dict = {
        "variant": spec.variant,
        "new_tokens": spec.new_tokens,
        "load_s": time.perf_counter() - started,
        "before_load": before,
        "after_load": memory_reading(),
        "weight_bytes": weight_bytes(engine.loaded.model),
        "precision": engine.loaded.precision.describe(),
        "torch_threads": torch.get_num_threads(),
    }
    names = list(spec.adapters)[: spec.requests]
    for name in names:
        engine.load_adapter(name, "device")
    throughput(engine, requests(names[:4], 4))  # warm-up
    n = spec.requests
    cases = {"base": [""] * n, "one": [names[0]] * n, "mixed": names}
    result["tok_s"] = {k: throughput(engine, requests(v, spec.new_tokens)) for k, v in cases.items()}
    if spec.agreement:
        result["engine_tokens"] = engine_tokens(engine, spec.agreement, spec.new_tokens)
    engine.stop(drain_timeout=5)
    if spec.agreement:  # the step thread's OpenMP team is gone: this thread may make the one team now
        set_thread_torch_threads(torch.get_num_threads())
        result["peft_tokens"] = peft_tokens(spec, engine.loaded.model, engine.tokenizer)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    raw = json.loads(args.spec.read_text())
    spec = Spec(**{**raw, "agreement": [tuple(p) for p in raw["agreement"]]})
    if spec.threads:
        torch.set_num_threads(spec.threads)
    serial_torch_thread()  # as serve's main thread: the engine's step thread is the one OpenMP team
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_third_party_notices()  # PEFT imports bitsandbytes
    args.out.write_text(json.dumps(run(spec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
