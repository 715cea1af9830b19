"""Routes to merged models: the router in process over the tiny Llama (fp32), with PEFT-made adapters
pushed to a local registry and merged by ``loraswap.merge``.

Each test checks what a route must guarantee: the same greedy tokens as the adapter served through the
shared base, requests switched only for the version the model was merged from, promotion while requests
stream (none fails, later ones on the route), demotion that frees the route's model, and every bad route
refused with its reason and nothing left behind.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loraswap.errors import InvalidArgumentError, NotFoundError, OverloadedError
from loraswap.merge.builder import merge_adapters
from loraswap.merge.sources import AdapterSource
from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.engine import Engine, EngineConfig
from loraswap.server.engine.api import GenerationRequest, SamplingParams
from loraswap.server.routes.route import RouteSpec, estimate_memory
from loraswap.server.routes.router import Router

PROMPTS = ("The quick brown fox", "Once upon a time", "In the beginning")
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture
def world(tiny_base: Path, make_adapter, tmp_path: Path) -> Iterator[dict]:
    root = tmp_path / "registry"
    registry, base = open_registry(root), resolve_base(tiny_base)
    first = registry.push(make_adapter(r=4, target_modules=TARGETS, seed=61), "bot", tags=["prod"], base=base)
    registry.push(make_adapter(r=8, target_modules=("q_proj", "v_proj"), seed=62), "other", base=base)
    config = EngineConfig(
        base=str(tiny_base), registry=str(root), quantization="fp32", adapter_slots=2, max_rank=8,
        max_batch_size=4, max_seq_len=160, tag_ttl_s=0.0,
    )  # fmt: skip
    engine = Engine(config)
    engine.start()
    router = Router(engine, drain_seconds=30)
    merged = tmp_path / "bot-merged"
    merge_adapters(base, [AdapterSource.from_registry(registry, "bot:prod")], merged, dtype="fp32")
    yield {"registry": registry, "engine": engine, "router": router, "merged": merged, "digest": first.digest}
    router.stop(drain_timeout=0)


def run(target, adapter: str, prompt: str, n: int = 24):
    return target.submit(GenerationRequest(adapter=adapter, prompt=prompt, sampling=greedy(n))).result(
        timeout=120
    )


def hits(engine: Engine, digest: str) -> int:
    return next((s.hits for s in engine.list_adapters() if s.digest == digest), 0)


def test_a_route_answers_with_the_adapters_greedy_tokens_and_no_adapter_work(world) -> None:
    engine, router, digest = world["engine"], world["router"], world["digest"]
    expected = [run(engine, "bot:prod", p).token_ids for p in PROMPTS]
    before = hits(engine, digest)
    router.add_configured([RouteSpec("bot:prod", str(world["merged"]))])
    (route,) = router.routes
    assert route.adapter_digest == digest and route.engine.config.adapter_slots == 0
    for prompt, tokens in zip(PROMPTS, expected, strict=True):
        result = run(router, "bot:prod", prompt)
        assert result.token_ids == tokens
        assert result.adapter_digest == digest  # the answer names the version, not the bare base
    assert run(router, f"bot@{digest}", PROMPTS[0]).token_ids == expected[0]  # same version, any spelling
    assert hits(engine, digest) == before, "a routed request went through the shared base"
    other = run(router, "other", PROMPTS[0])  # every other adapter still goes through the shared base
    assert other.adapter_digest != digest and other.token_ids == run(engine, "other", PROMPTS[0]).token_ids
    (status,) = router.route_statuses()
    assert status.state == "serving" and status.method == "linear"
    assert status.weights_bytes > 0 and status.kv_cache_bytes == route.engine.kv.nbytes
    # On CPU the route's step thread runs serially beside the shared engine's (one OpenMP team)
    assert route.engine.config.step_threads == 1 and route.engine.step_threads == 1
    assert engine.config.step_threads is None and engine.step_threads == torch.get_num_threads()


def test_a_route_from_a_registry_model_and_moved_tags(
    world, make_adapter, tiny_base: Path, tmp_path: Path
) -> None:
    registry, router = world["registry"], world["router"]
    model = registry.push_model(world["merged"], "bot-merged:v1")
    router.add_configured([RouteSpec("bot:prod", "bot-merged:v1")])
    (route,) = router.routes
    assert route.model_digest == model.digest and router.route_for("bot:prod") is route
    newer = registry.push(
        make_adapter(r=4, target_modules=TARGETS, seed=63), "bot", tags=["prod"], base=resolve_base(tiny_base)
    )
    # The tag moved (TTL 0 here): the merged model is of the old version, so the shared base answers.
    assert router.route_for("bot:prod") is None
    assert run(router, "bot:prod", PROMPTS[0]).adapter_digest == newer.digest
    assert router.route_statuses()[0].state == "stale"
    assert router.route_for(f"bot@{world['digest']}") is route  # the old version is still routed

    # The model tag moves too (a merge of the new version pushed under it): the route follows it.
    newer_merged = tmp_path / "bot-merged-2"
    source = AdapterSource.from_registry(registry, "bot:prod")
    merge_adapters(resolve_base(tiny_base), [source], newer_merged, dtype="fp32")
    moved = registry.push_model(newer_merged, "bot-merged:v1")
    assert router.route_for("bot:prod") is None  # still the shared base; the follow starts behind it
    router.settle()
    (followed,) = router.routes
    assert followed is not route and followed.model_digest == moved.digest
    assert router.route_for("bot:prod") is followed and followed.adapter_digest == newer.digest
    expected = run(world["engine"], "bot:prod", PROMPTS[1]).token_ids
    assert run(router, "bot:prod", PROMPTS[1]).token_ids == expected
    assert route.engine.loaded is None  # the replaced route's model is freed
    assert router.follow(followed) is None  # nothing moved since


def test_promotion_while_requests_stream_then_demotion_frees_the_route(world) -> None:
    engine, router, digest = world["engine"], world["router"], world["digest"]
    n = 40
    expected = {p: run(engine, "bot:prod", p, n).token_ids for p in PROMPTS}
    handles = [
        router.submit(GenerationRequest(adapter="bot:prod", prompt=p, sampling=greedy(n))) for p in PROMPTS
    ]
    streams = [h.events(timeout=120) for h in handles]
    firsts = [next(s) for s in streams]  # every one is running on the shared base
    assert all(f.token_ids for f in firsts)
    results: list = [None] * len(handles)

    def finish(i: int) -> None:
        for event in streams[i]:
            results[i] = event.result

    readers = [threading.Thread(target=finish, args=(i,)) for i in range(len(handles))]
    for reader in readers:
        reader.start()
    route = router.promote("bot:prod", timeout=300)
    assert router.route_for("bot:prod") is route and route.promoted
    before = hits(engine, digest)
    later = [run(router, "bot:prod", p, n) for p in PROMPTS]
    assert hits(engine, digest) == before, "a request after the switch went through the shared base"
    for reader in readers:
        reader.join(timeout=120)
    assert all(r is not None and r.finish_reason == "length" for r in results), "a running request failed"
    for prompt, early, late in zip(PROMPTS, results, later, strict=True):
        assert early.token_ids == expected[prompt] == late.token_ids
    assert router.promote("bot", timeout=300) is route  # the same version again: the same route

    model = weakref.ref(route.engine.forward.model)
    folder = route.folder
    freed = router.demote("bot:prod")
    assert freed.weights > 0 and freed.kv_cache > 0
    assert router.routes == () and router.route_for("bot:prod") is None and not folder.exists()
    del route
    gc.collect()
    assert model() is None, "the demoted route's model is still referenced"
    assert run(router, "bot:prod", PROMPTS[0], n).token_ids == expected[PROMPTS[0]]  # the shared base again
    with pytest.raises(NotFoundError, match="has no route"):
        router.demote("bot:prod")


def test_bad_routes_are_refused_with_their_reason_and_leave_nothing(world, tmp_path: Path) -> None:
    router, merged = world["router"], world["merged"]
    with pytest.raises(NotFoundError, match="does not exist"):
        router.add_configured([RouteSpec("bot:prod", str(tmp_path / "missing"))])
    with pytest.raises(NotFoundError, match="neither a folder nor in the registry"):
        router.add_configured([RouteSpec("bot:prod", "no-such-model:v1")])
    with pytest.raises(InvalidArgumentError, match="is an adapter, not a merged model"):
        router.add_configured([RouteSpec("bot:prod", "other")])
    with pytest.raises(InvalidArgumentError) as wrong_adapter:
        router.add_configured([RouteSpec("other", str(merged))])
    assert "merged from adapter 'bot', not 'other'" in str(wrong_adapter.value.problems)
    with pytest.raises(InvalidArgumentError, match="a route is REF=MODEL"):
        RouteSpec.parse("bot:prod")
    # The first route is up when the second fails: start-up refuses both, nothing stays running.
    with pytest.raises(NotFoundError):
        router.add_configured([RouteSpec("bot:prod", str(merged)), RouteSpec("x", str(tmp_path / "none"))])
    assert router.routes == ()
    with pytest.raises(NotFoundError):
        router.promote("no-such-adapter")


def test_a_route_over_the_memory_budget_is_refused_with_the_numbers(world) -> None:
    engine, merged = world["engine"], world["merged"]
    config = engine.config
    need = estimate_memory(merged, config, "fp32")
    tight = Router(engine, route_memory_bytes=need.total - 1)
    with pytest.raises(OverloadedError) as refused:
        tight.add_configured([RouteSpec("bot:prod", str(merged))])
    message = str(refused.value)
    assert "does not fit in memory" in message and "weights" in message and "KV cache" in message
    assert tight.routes == ()
    fits = Router(engine, route_memory_bytes=need.total)
    fits.add_configured([RouteSpec("bot:prod", str(merged))])
    (route,) = fits.routes
    assert route.memory.total <= need.total, "the route holds more than its estimate"
    with pytest.raises(OverloadedError):  # the budget is spent: a promotion is refused before merging
        fits.promote("other", timeout=300)
    for r in fits.routes:
        r.stop(0)


def test_the_estimate_counts_the_packed_copy_of_a_tied_lm_head(tiny_base: Path, tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    from loraswap.server.engine.packed import packing_supported

    if not packing_supported(torch.float32, torch.device("cpu")):
        pytest.skip("this torch build cannot pack fp32 weights on this CPU")
    tied = tmp_path / "tied"
    tied.mkdir()
    tensors = load_file(str(tiny_base / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(tied / "model.safetensors"))
    config = json.loads((tiny_base / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    engine_config = EngineConfig(base=str(tied), device="cpu")
    packed = estimate_memory(tied, engine_config, "fp32")
    plain = estimate_memory(tied, dataclasses.replace(engine_config, pack_weights=False), "fp32")
    vocab = tensors["model.embed_tokens.weight"].numel() * 4
    assert packed.weights - plain.weights == vocab and packed.kv_cache == plain.kv_cache
    half = estimate_memory(tied, engine_config, "fp16")  # fp16 weights are never packed: no extra copy
    assert half == estimate_memory(tied, dataclasses.replace(engine_config, pack_weights=False), "fp16")
    untied = EngineConfig(base=str(tiny_base), device="cpu")  # an own lm_head is packed in its place
    assert estimate_memory(tiny_base, untied, "fp32") == estimate_memory(
        tiny_base, dataclasses.replace(untied, pack_weights=False), "fp32"
    )


def test_the_estimate_holds_every_fp16w_linear_lm_head_included_in_two_bytes(
    tiny_base: Path, tmp_path: Path
) -> None:
    import json

    from safetensors.torch import load_file, save_file

    from loraswap.server.engine.weight_only import half_weights_supported

    if not half_weights_supported():
        pytest.skip("fbgemm's fp16 matmul does not run on this CPU or torch build")
    tensors = load_file(str(tiny_base / "model.safetensors"))
    linear = sum(t.numel() for n, t in tensors.items() if n.endswith("proj.weight"))
    head, vocab = tensors["lm_head.weight"].numel(), tensors["model.embed_tokens.weight"].numel()
    plain = EngineConfig(base=str(tiny_base), device="cpu", pack_weights=False)
    fp32 = estimate_memory(tiny_base, plain, "fp32")
    fp16w = estimate_memory(tiny_base, dataclasses.replace(plain, pack_weights=True), "fp16w")
    assert fp32.weights - fp16w.weights == 2 * (linear + head) and fp16w.kv_cache == fp32.kv_cache
    tied = tmp_path / "tied"
    tied.mkdir()
    del tensors["lm_head.weight"]
    save_file(tensors, str(tied / "model.safetensors"))
    config = json.loads((tiny_base / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tied_config = dataclasses.replace(plain, base=str(tied))
    # a tied lm_head gets an fp16 copy beside the fp32 embedding
    assert estimate_memory(tied, tied_config, "fp16w").weights == (
        estimate_memory(tied, tied_config, "fp32").weights - 2 * linear + 2 * vocab
    )
