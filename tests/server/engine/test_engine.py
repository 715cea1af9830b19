"""The multi-LoRA engine against the PEFT oracle, and its batching, errors and cache tiers."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loraswap.errors import (
    AdapterValidationError,
    CancelledError,
    DeadlineExceededError,
    DrainingError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    NotFoundError,
    OverloadedError,
)
from loraswap.models import resolve_base
from loraswap.registry.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import ChatMessage, GenerationRequest, SamplingParams
from loraswap.server.engine.forward import SeqChunk
from loraswap.server.engine.weight_only import half_weights_supported

PROMPTS = ["The quick brown fox", "Paris is the capital", "def add(a, b):", "Adapters are small low"]
# Mixed ranks, module subsets, rsLoRA and alpha: each a distinct adapter for the same tiny base.
ADAPTER_SPECS = {
    "r4-qv": dict(r=4, target_modules=("q_proj", "v_proj"), seed=11),
    "r8-all": dict(
        r=8,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        seed=12,
    ),
    "r16-mlp": dict(r=16, alpha=8.0, target_modules=("gate_proj", "up_proj", "down_proj"), seed=13),
    "r2-o": dict(r=2, alpha=32.0, target_modules=("o_proj",), seed=14),
    "rs8-kv": dict(r=8, target_modules=("k_proj", "v_proj"), use_rslora=True, seed=15),
    "r12-qd": dict(r=12, target_modules=("q_proj", "down_proj"), seed=16),
    "r6-up": dict(r=6, target_modules=("up_proj",), seed=17),
    "r32-v": dict(r=32, alpha=64.0, target_modules=("v_proj",), seed=18),
}


@pytest.fixture(scope="module")
def registry_with_adapters(tmp_path_factory, tiny_base: Path, make_adapter):
    """A local registry holding the eight adapters above, pushed for the tiny base."""
    registry = open_registry(tmp_path_factory.mktemp("registry"))
    base = resolve_base(tiny_base)
    folders = {}
    for name, spec in ADAPTER_SPECS.items():
        folders[name] = make_adapter(**spec)
        registry.push(folders[name], name, base=base)
    return registry, folders


def make_engine(tiny_base: Path, registry, **overrides) -> Engine:
    config = EngineConfig(
        base=str(tiny_base),
        quantization="fp32",
        adapter_slots=8,
        max_rank=32,
        max_batch_size=16,
        max_seq_len=96,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    engine = Engine(config, registry=registry)
    engine.start()
    return engine


@pytest.fixture
def engine(tiny_base: Path, registry_with_adapters):
    engine = make_engine(tiny_base, registry_with_adapters[0])
    yield engine
    engine.stop(drain_timeout=5)


def peft_model(tiny_base: Path, adapter: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


@pytest.mark.slow
def test_mixed_batch_is_token_identical_to_peft(
    engine: Engine, registry_with_adapters, tiny_base: Path, greedy
) -> None:
    _, folders = registry_with_adapters
    names = ["", *ADAPTER_SPECS]
    requests = [
        GenerationRequest(adapter=n, prompt=p, sampling=greedy(10)) for n in names for p in PROMPTS[:2]
    ]
    results = [h.result(timeout=120) for h in [engine.submit(r) for r in requests]]
    tokenizer = engine.tokenizer
    for name in names:
        oracle = peft_model(tiny_base, folders.get(name))
        for prompt in PROMPTS[:2]:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            expected = oracle.generate(
                ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            got = results[requests.index(GenerationRequest(adapter=name, prompt=prompt, sampling=greedy(10)))]
            assert list(got.token_ids) == expected[0, ids.shape[1] :].tolist(), (name, prompt)
            assert got.adapter_digest.startswith("sha256:") if name else got.adapter_digest == ""


def test_mixed_batch_logits_match_peft(engine: Engine, registry_with_adapters, tiny_base: Path) -> None:
    _, folders = registry_with_adapters
    names = list(ADAPTER_SPECS)
    slots = {n: engine.load_adapter(n, "device") for n in names}
    tokenizer = engine.tokenizer
    chunks, rows = [], []
    for i, name in enumerate(["", *names]):
        ids = tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]
        slot = -1 if not name else engine.adapters.slots.slot_of(slots[name].digest)
        row = engine.kv.allocate()
        rows.append(row)
        chunks.append(SeqChunk(row, ids, 0, slot, True))
    with engine.step_lock:
        logits = engine.forward(chunks)
    for row in rows:
        engine.kv.release(row)
    for i, name in enumerate(["", *names]):
        oracle = peft_model(tiny_base, folders.get(name))
        ids = tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = oracle(ids).logits[0, -1]
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "rows",
    [[0, 1, 2], [2, 0, 1], [0, 2, 3], [0, 7, 15]],
    ids=["compact", "permuted", "span-with-hole", "gathered"],
)
def test_decode_attention_is_the_same_for_any_placement_of_kv_rows(
    engine: Engine, registry_with_adapters, tiny_base: Path, rows: list[int]
) -> None:
    """Decode logits equal a full forward of prompt + token, whether attention reads a view of the
    rows (compact, permuted, with unused rows inside the span) or gathers them."""
    _, folders = registry_with_adapters
    name = next(iter(ADAPTER_SPECS))
    slot = engine.adapters.slots.slot_of(engine.load_adapter(name, "device").digest)
    tokenizer = engine.tokenizer
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    adapters = [-1, -1, slot]  # already in the order forward() sorts chunks (by slot)
    with engine.step_lock:
        taken = [engine.kv.allocate() for _ in range(engine.config.max_batch_size)]
        engine.forward(
            [SeqChunk(r, ids, 0, s, False) for r, ids, s in zip(rows, prompts, adapters, strict=True)]
        )
        decode = [
            SeqChunk(r, [7 + i], len(ids), s, True)
            for i, (r, ids, s) in enumerate(zip(rows, prompts, adapters, strict=True))
        ]
        logits = engine.forward(decode)
        for row in taken:
            engine.kv.release(row)
    for i, (ids, s) in enumerate(zip(prompts, adapters, strict=True)):
        oracle = peft_model(tiny_base, folders.get(name) if s >= 0 else None)
        with torch.no_grad():
            expected = oracle(torch.tensor([[*ids, 7 + i]])).logits[0, -1]
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantization", ["fp32", "bf16", "fp16", "nf4", "int8", "fp16w"])
def test_base_output_unchanged_after_200_adapter_loads(
    tiny_base: Path, registry_with_adapters, quantization, greedy
) -> None:
    if quantization in ("nf4", "int8"):
        pytest.importorskip("bitsandbytes")  # the [cuda] extra
    if quantization == "fp16w" and not half_weights_supported():
        pytest.skip("fbgemm's fp16 matmul does not run on this CPU or torch build")
    registry, _ = registry_with_adapters
    engine = make_engine(tiny_base, registry, quantization=quantization, adapter_slots=2)
    try:
        request = GenerationRequest(prompt=PROMPTS[0], sampling=greedy(8))
        with engine.step_lock:
            row = engine.kv.allocate()
            ids = engine.tokenizer(PROMPTS[0])["input_ids"]
            before = engine.forward([SeqChunk(row, ids, 0, -1, True)])
        first = engine.generate(request)
        names = list(ADAPTER_SPECS)
        for i in range(200):
            engine.load_adapter(names[i % len(names)], "device")
            if i % 3 == 0:
                engine.unload_adapter(names[i % len(names)])
        with engine.step_lock:
            after = engine.forward([SeqChunk(row, ids, 0, -1, True)])
            engine.kv.release(row)
        assert torch.equal(before, after)
        assert engine.generate(request).token_ids == first.token_ids
    finally:
        engine.stop(drain_timeout=5)


def test_more_adapters_than_slots_all_finish_correctly(
    tiny_base: Path, registry_with_adapters, greedy
) -> None:
    registry, _ = registry_with_adapters
    engine = make_engine(tiny_base, registry, adapter_slots=2, max_batch_size=4)
    wide = make_engine(tiny_base, registry)
    try:
        requests = [
            GenerationRequest(adapter=n, prompt=PROMPTS[0], sampling=greedy(6)) for n in ADAPTER_SPECS
        ] * 2
        got = [h.result(timeout=120) for h in [engine.submit(r) for r in requests]]
        expected = [wide.generate(r) for r in requests]
        assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    finally:
        engine.stop(drain_timeout=5)
        wide.stop(drain_timeout=5)


def test_request_joins_while_others_decode(tiny_base: Path, registry_with_adapters, greedy) -> None:
    """A request that arrives while a batch decodes joins it at a step boundary and finishes first: the
    test steps the engine itself, so the order is the engine's, not the clock's."""
    config = EngineConfig(
        base=str(tiny_base), quantization="fp32", adapter_slots=8, max_rank=32, max_batch_size=16,
        max_seq_len=96,
    )  # fmt: skip
    engine = Engine(config, registry=registry_with_adapters[0])  # not started: stepped below

    def step() -> None:
        with engine.step_lock:
            engine.take_incoming()
            engine.step()

    try:
        long = [
            engine.submit(GenerationRequest(adapter="r4-qv", prompt=p, sampling=greedy(60))) for p in PROMPTS
        ]
        while not all(h.state.output_ids for h in long):  # the first batch is decoding
            step()
        late = engine.submit(GenerationRequest(adapter="r8-all", prompt=PROMPTS[1], sampling=greedy(2)))
        while len(late.state.output_ids) < 2:
            step()
        assert late.result(timeout=30).completion_tokens == 2
        decoded = [len(h.state.output_ids) for h in long]
        assert all(0 < n < 60 for n in decoded), decoded  # it joined them mid-flight and left first
        while any(len(h.state.output_ids) < 60 for h in long):
            step()
        assert [h.result(timeout=30).completion_tokens for h in long] == [60] * len(long)
    finally:
        engine.stop(drain_timeout=0)


def test_streaming_events_add_up_to_the_result(engine: Engine, greedy) -> None:
    handle = engine.submit(GenerationRequest(adapter="r8-all", prompt=PROMPTS[2], sampling=greedy(12)))
    events = list(handle.events(timeout=30))
    assert events[-1].finished and not any(e.finished for e in events[:-1])
    assert "".join(e.text for e in events) == events[-1].result.text
    assert sum(len(e.token_ids) for e in events) == 12


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine: Engine, greedy) -> None:
    params = SamplingParams(
        max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True
    )
    alone = engine.generate(GenerationRequest(adapter="r4-qv", prompt=PROMPTS[0], sampling=params))
    crowd = [engine.submit(GenerationRequest(adapter="r2-o", prompt=p, sampling=greedy(12))) for p in PROMPTS]
    again = engine.generate(GenerationRequest(adapter="r4-qv", prompt=PROMPTS[0], sampling=params))
    for handle in crowd:
        handle.result(timeout=30)
    assert alone.token_ids == again.token_ids
    other = engine.generate(
        GenerationRequest(
            adapter="r4-qv", prompt=PROMPTS[0], sampling=SamplingParams(**{**params.__dict__, "seed": 99})
        )
    )
    assert other.token_ids != alone.token_ids


def test_stop_strings_and_chat_messages(engine: Engine, greedy) -> None:
    free = engine.generate(GenerationRequest(adapter="r8-all", prompt=PROMPTS[1], sampling=greedy(16)))
    cut = free.text[3:5]
    assert cut
    stopped = engine.generate(
        GenerationRequest(adapter="r8-all", prompt=PROMPTS[1], sampling=greedy(16, stop=(cut,)))
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(cut)]
    chat = engine.generate(
        GenerationRequest(adapter="r4-qv", messages=(ChatMessage("user", "hello"),), sampling=greedy(4))
    )
    expected_ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True
    )
    assert chat.prompt_tokens == len(
        expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids
    )


def test_bad_requests_are_refused_with_every_reason(engine: Engine) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        engine.submit(
            GenerationRequest(
                prompt="x",
                messages=(ChatMessage("user", "y"),),
                sampling=SamplingParams(top_p=0, temperature=-1),
            )
        )
    assert len(info.value.problems) == 3
    with pytest.raises(InvalidArgumentError, match="limit"):
        engine.submit(GenerationRequest(prompt="fox " * 200))


def test_unknown_and_incompatible_adapters_never_fall_back_to_the_base(
    engine: Engine, registry_with_adapters, make_adapter, other_tiny_base: Path, tmp_path: Path
) -> None:
    registry, _ = registry_with_adapters
    with pytest.raises(NotFoundError):
        engine.generate(GenerationRequest(adapter="no-such-adapter", prompt="x"))
    with pytest.raises(NotFoundError):
        engine.generate(GenerationRequest(adapter="r4-qv:no-such-tag", prompt="x"))
    foreign = make_adapter(base=other_tiny_base, r=4)
    registry.push(foreign, "foreign", base=resolve_base(other_tiny_base))
    with pytest.raises(IncompatibleAdapterError) as info:
        engine.generate(GenerationRequest(adapter="foreign", prompt="x"))
    assert any("base" in p for p in info.value.problems) and any("lora_A" in p for p in info.value.problems)
    too_big = make_adapter(r=64, target_modules=("q_proj",))
    registry.push(too_big, "too-big")
    with pytest.raises(IncompatibleAdapterError, match="max rank"):
        engine.generate(GenerationRequest(adapter="too-big", prompt="x"))
    assert isinstance(IncompatibleAdapterError("x"), Exception) and not issubclass(
        AdapterValidationError, IncompatibleAdapterError
    )


def _wait_until(predicate, timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


def test_queue_bound_cancellation_deadline_and_drain(tiny_base: Path, registry_with_adapters, greedy) -> None:
    registry, _ = registry_with_adapters
    config = EngineConfig(
        base=str(tiny_base), quantization="fp32", max_batch_size=1, max_queue=2, max_seq_len=96
    )
    engine = Engine(config, registry=registry)  # stepped by hand until the drain: no step runs unasked
    try:
        running = engine.submit(GenerationRequest(prompt=PROMPTS[0], sampling=greedy(80)))
        engine.take_incoming()
        engine.step()  # in the only batch row, first token out
        queued = [engine.submit(GenerationRequest(prompt=PROMPTS[1], sampling=greedy(2))) for _ in range(2)]
        with pytest.raises(OverloadedError):
            engine.submit(GenerationRequest(prompt=PROMPTS[1]))
        running.cancel()
        _drive(engine, lambda: not (engine._incoming or engine._waiting or engine._running))
        with pytest.raises(CancelledError):
            running.result(timeout=30)
        assert len(running.state.output_ids) == 1  # dropped at the first step after the cancel
        assert [q.result(timeout=30).completion_tokens for q in queued] == [2, 2]
        late = engine.submit(GenerationRequest(prompt=PROMPTS[0], sampling=greedy(80)))
        engine.take_incoming()
        engine.step()  # running, first token out
        late.state.request = replace(late.state.request, deadline=time.monotonic() - 1)  # its deadline passed
        engine.step()
        with pytest.raises(DeadlineExceededError):
            late.result(timeout=30)
        assert len(late.state.output_ids) == 1 and engine.kv.free_rows == 1
        engine.start()
        with engine.step_lock:  # no step runs while this is held: the drain begins with inflight unfinished
            inflight = engine.submit(GenerationRequest(prompt=PROMPTS[0], sampling=greedy(20)))
            stopper = threading.Thread(target=engine.stop, kwargs={"drain_timeout": 30})
            stopper.start()
            assert _wait_until(lambda: engine.draining)
            with pytest.raises(DrainingError):
                engine.submit(GenerationRequest(prompt=PROMPTS[0]))
            assert not inflight.state.output_ids
        assert inflight.result(timeout=30).completion_tokens == 20
        stopper.join()
    finally:
        engine.stop(drain_timeout=1)


def test_moved_tag_takes_effect_after_ttl(
    tiny_base: Path, registry_with_adapters, make_adapter, greedy
) -> None:
    registry, folders = registry_with_adapters
    engine = make_engine(tiny_base, registry, tag_ttl_s=0.0)
    try:
        registry.push(folders["r4-qv"], "moving", tags=["prod"])
        first = engine.generate(
            GenerationRequest(adapter="moving:prod", prompt=PROMPTS[0], sampling=greedy(4))
        )
        registry.push(folders["r8-all"], "moving", tags=["prod"])
        second = engine.generate(
            GenerationRequest(adapter="moving:prod", prompt=PROMPTS[0], sampling=greedy(4))
        )
        assert first.adapter_digest != second.adapter_digest
        pinned = engine.generate(
            GenerationRequest(adapter=f"moving@{first.adapter_digest}", prompt=PROMPTS[0], sampling=greedy(4))
        )
        assert pinned.token_ids == first.token_ids
    finally:
        engine.stop(drain_timeout=5)


def test_admin_tiers_pin_and_listing(engine: Engine, greedy) -> None:
    status = engine.load_adapter("r16-mlp", "host")
    assert "host" in status.tiers and "device" not in status.tiers and status.rank == 16
    status = engine.pin("r16-mlp")
    assert status.pinned and "device" in status.tiers
    engine.generate(GenerationRequest(adapter="r16-mlp", prompt="x", sampling=greedy(2)))
    listed = {s.name: s for s in engine.list_adapters()}
    assert listed["r16-mlp"].hits == 1 and listed["r16-mlp"].last_used > 0
    assert not engine.unpin("r16-mlp").pinned
    engine.unload_adapter("r16-mlp")
    assert engine.adapters.status(status.digest).tiers in ((), ("disk",))
    info = engine.info()
    assert info.adapter_slots == 8 and info.quantization == "fp32" and info.kv_cache_bytes > 0


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_llama_family_bases_match_transformers(arch: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from loraswap.devtools.tiny import build_tiny_llama

    base = build_tiny_llama(tmp_path / arch, arch=arch)
    engine = Engine(EngineConfig(base=str(base), quantization="fp32", max_seq_len=64, max_batch_size=2))
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    row = engine.kv.allocate()
    got = engine.forward([SeqChunk(row, ids, 0, -1, True)])[0]
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    engine.adapters.close()


def test_unsupported_bases_are_refused(tmp_path: Path) -> None:
    import json

    from loraswap.devtools.tiny import build_tiny_llama

    base = build_tiny_llama(tmp_path / "mistral", arch="mistral")
    config = json.loads((base / "config.json").read_text())
    config["sliding_window"] = 32
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgumentError, match="sliding-window"):
        Engine(EngineConfig(base=str(base), quantization="fp32", max_seq_len=64))
    config["model_type"] = "gpt2"
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgumentError, match="gpt2"):
        Engine(EngineConfig(base=str(base), quantization="fp32"))


class StepRecorder:
    """An EngineObserver that records each step's (batch size, prefill tokens)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def on_step(self, batch_size: int, distinct_adapters: int, prefill_tokens: int, seconds: float) -> None:
        self.steps.append((batch_size, prefill_tokens))

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("policy", ["separate", "mixed"])
def test_prefill_policy_shapes_the_steps(
    tiny_base: Path, registry_with_adapters, policy: str, greedy
) -> None:
    recorder = StepRecorder()
    config = EngineConfig(base=str(tiny_base), quantization="fp32", max_seq_len=96, prefill_policy=policy)
    engine = Engine(config, observer=recorder, registry=registry_with_adapters[0])  # stepped by hand
    first = engine.submit(GenerationRequest(prompt=PROMPTS[0], sampling=greedy(20)))
    engine.take_incoming()
    engine.step()
    engine.step()
    engine.submit(GenerationRequest(prompt=PROMPTS[1], sampling=greedy(20)))
    engine.take_incoming()
    engine.step()
    engine.step()
    prompt_len = len(engine.tokenizer(PROMPTS[1])["input_ids"])
    if policy == "separate":  # the newcomer's prefill runs alone, then everyone decodes together
        assert recorder.steps[2:] == [(1, prompt_len), (2, 0)]
    else:  # the newcomer's prefill rides along with the running decode
        assert recorder.steps[2:] == [(2, prompt_len), (2, 0)]
    assert len(first.state.output_ids) == (4 if policy == "mixed" else 3)
    engine.adapters.close()


def test_async_streaming(engine: Engine, greedy) -> None:
    import asyncio

    async def collect() -> list:
        handle = engine.submit(GenerationRequest(adapter="r4-qv", prompt=PROMPTS[3], sampling=greedy(5)))
        return [event async for event in handle.aevents()]

    events = asyncio.run(collect())
    assert events[-1].finished and sum(len(e.token_ids) for e in events) == 5
    assert "".join(e.text for e in events) == events[-1].result.text


def _drive(engine: Engine, done, timeout: float = 60.0) -> None:
    """Run the step loop by hand (the engine is not started) until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "engine made no progress"
        engine.take_incoming()
        if engine._running or engine._ready_waiting():
            engine.step()
        else:
            time.sleep(0.005)  # adapters still loading in the background


def _stepped_engine(tiny_base: Path, registry, between_layers: bool, **overrides) -> Engine:
    """An engine whose step loop is not started: the test runs each step itself (see :func:`_drive`)."""
    config = EngineConfig(
        base=str(tiny_base), quantization="fp32", adapter_slots=8, max_rank=32, max_batch_size=16,
        max_seq_len=96, prefill_between_layers=between_layers, **overrides,
    )  # fmt: skip
    return Engine(config, registry=registry)


@pytest.mark.parametrize("between_layers", [True, False])
def test_a_request_arriving_mid_decode_step_is_prefilled_inside_that_step(
    tiny_base: Path, registry_with_adapters, between_layers: bool, greedy
) -> None:
    engine = _stepped_engine(tiny_base, registry_with_adapters[0], between_layers)
    names = list(ADAPTER_SPECS)
    requests = [
        GenerationRequest(adapter=n, prompt=PROMPTS[i], sampling=greedy(6)) for i, n in enumerate(names[:3])
    ]
    probe_request = GenerationRequest(adapter=names[3], prompt=PROMPTS[3], sampling=greedy(4))
    for name in names[:4]:  # ready as soon as they arrive: a late load would let one finish first
        engine.load_adapter(name, "host")
    handles = [engine.submit(r) for r in requests]
    _drive(engine, lambda: len(engine._running) == 3 and all(s.output_ids for s in engine._running))
    probe: list = []

    def arrive_now(*_) -> None:
        if not probe:
            probe.append(engine.submit(probe_request))
            probe[0].state.adapter.result(timeout=30)  # resolved while this layer runs

    arrive = engine.forward.inner.layers[0].input_layernorm.register_forward_pre_hook(arrive_now)
    before = {id(s): len(s.output_ids) for s in engine._running}
    engine.step()  # one decode step; the probe arrives during its first layer
    arrive.remove()
    decoders = [s for s in engine._running if id(s) in before]
    assert all(len(s.output_ids) == before[id(s)] + 1 for s in decoders)  # the step still finished
    assert len(probe[0].state.output_ids) == (1 if between_layers else 0)
    _drive(engine, lambda: not (engine._incoming or engine._waiting or engine._running))
    alone = _stepped_engine(tiny_base, registry_with_adapters[0], between_layers)
    try:
        for request, handle in zip([*requests, probe_request], [*handles, *probe], strict=True):
            solo = alone.submit(request)
            _drive(alone, lambda: not (alone._incoming or alone._waiting or alone._running))
            assert handle.result().token_ids == solo.result().token_ids  # same tokens as run alone
    finally:
        alone.stop(drain_timeout=1)
        engine.stop(drain_timeout=1)


def test_the_table_of_known_adapters_stays_bounded_and_keeps_resident_ones(engine: Engine) -> None:
    names = list(ADAPTER_SPECS)
    engine.adapters.max_tracked = 3
    engine.load_adapter(names[0], "device")
    engine.load_adapter(names[1], "host")
    for name in names[2:]:
        engine.load_adapter(name, "disk")  # pulled and remembered, in no memory tier
    listed = [s.name for s in engine.list_adapters()]
    assert len(listed) == 3
    assert names[0] in listed and names[1] in listed  # on the device / in host RAM: never forgotten
    assert names[-1] in listed  # the most recent one of the rest
    engine.load_adapter(names[2], "device")  # a forgotten adapter comes back when used again
    assert names[2] in [s.name for s in engine.list_adapters()]


@pytest.mark.parametrize("between_layers", [True, False])
def test_a_prompt_the_alternation_defers_is_prefilled_inside_the_decode_step(
    tiny_base: Path, registry_with_adapters, between_layers: bool, greedy
) -> None:
    engine = _stepped_engine(tiny_base, registry_with_adapters[0], between_layers)
    try:
        names = list(ADAPTER_SPECS)
        for name in names[:2]:  # both ready at once: a late load would let the other finish first
            engine.load_adapter(name, "host")
        first = [
            engine.submit(GenerationRequest(adapter=n, prompt=PROMPTS[i], sampling=greedy(6)))
            for i, n in enumerate(names[:2])
        ]
        _drive(engine, lambda: len(engine._running) == 2 and all(s.output_ids for s in engine._running))
        late = engine.submit(GenerationRequest(adapter=names[2], prompt=PROMPTS[2], sampling=greedy(3)))
        late.state.adapter.result(timeout=30)
        engine.take_incoming()
        engine.scheduler.last_step_prefilled = True  # so the alternation picks a decode step now
        before = [len(h.state.output_ids) for h in first]
        engine.step()
        assert [len(h.state.output_ids) for h in first] == [n + 1 for n in before]  # the decode step ran
        assert len(late.state.output_ids) == (1 if between_layers else 0)
        _drive(engine, lambda: not (engine._incoming or engine._waiting or engine._running))
        assert len(late.result().token_ids) == 3
    finally:
        engine.stop(drain_timeout=1)


def test_a_one_token_last_prompt_chunk_is_not_prefilled_twice_when_a_request_arrives(
    tiny_base: Path, registry_with_adapters, greedy
) -> None:
    """A step holding only a one-token last prompt chunk looks like a decode step; a request arriving
    during it is prefilled between layers, but the step's own chunk must not run again there."""
    names = list(ADAPTER_SPECS)
    request = GenerationRequest(adapter=names[0], prompt=PROMPTS[0], sampling=greedy(4))
    probe_request = GenerationRequest(adapter=names[1], prompt=PROMPTS[1], sampling=greedy(3))
    solo = _stepped_engine(tiny_base, registry_with_adapters[0], True)
    engine = None
    try:
        expected = solo.submit(request)
        _drive(solo, lambda: not (solo._incoming or solo._waiting or solo._running))
        prompt_len = len(solo.tokenizer(PROMPTS[0])["input_ids"])
        engine = _stepped_engine(tiny_base, registry_with_adapters[0], True, prefill_chunk=prompt_len - 1)
        engine.load_adapter(names[1], "host")
        handle = engine.submit(request)
        _drive(engine, lambda: bool(engine._running) and engine._running[0].cached == prompt_len - 1)
        probe: list = []

        def arrive_now(*_) -> None:
            if not probe:
                probe.append(engine.submit(probe_request))
                probe[0].state.adapter.result(timeout=30)

        arrive = engine.forward.inner.layers[0].input_layernorm.register_forward_pre_hook(arrive_now)
        engine.step()  # only the one-token last chunk of the prompt, and the probe arriving
        arrive.remove()
        assert handle.state.cached == prompt_len and len(handle.state.output_ids) == 1
        assert probe[0].state.cached > 0  # its first prompt chunk ran inside the step
        _drive(engine, lambda: not (engine._incoming or engine._waiting or engine._running))
        assert handle.result().token_ids == expected.result().token_ids
    finally:
        solo.stop(drain_timeout=1)
        if engine is not None:
            engine.stop(drain_timeout=1)


def test_a_cached_copy_damaged_behind_unchanged_stats_is_fetched_again(
    tiny_base: Path, registry_with_adapters, greedy
) -> None:
    """The disk cache is trusted by file stats; a damaged file whose size and mtime were kept still
    loads correctly: the failed read makes the engine hash the copy again and fetch it anew."""
    import os

    from loraswap import paths

    registry, folders = registry_with_adapters
    name = next(iter(ADAPTER_SPECS))
    manifest = registry.resolve(name)
    cached = registry.pull(name) / "adapter_model.safetensors"
    stat = cached.stat()
    data = bytearray(cached.read_bytes())
    data[20:40] = b"\xff" * 20  # inside the JSON header: unreadable
    cached.write_bytes(bytes(data))
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime, same inode
    after = cached.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    assert registry.pull(name) == cached.parent  # trusted without hashing: still the damaged bytes
    engine = make_engine(tiny_base, registry)
    try:
        request = GenerationRequest(adapter=name, prompt=PROMPTS[0], sampling=greedy(6))
        got = engine.generate(request)
        assert got.adapter_digest == manifest.digest
        assert (paths.adapter_cache_dir() / manifest.hex / "adapter_model.safetensors").read_bytes() == (
            folders[name] / "adapter_model.safetensors"
        ).read_bytes()
        oracle = peft_model(tiny_base, folders[name])
        ids = engine.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        expected = oracle.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert list(got.token_ids) == expected[0, ids.shape[1] :].tolist()
    finally:
        engine.stop(drain_timeout=5)
