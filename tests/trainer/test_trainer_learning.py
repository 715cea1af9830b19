"""The embedded SmolLM2 learns a made-up fact table on CPU, and plain PEFT serves what it learned."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from loraswap.trainer.probe import ProbeResult, learning_check

DATA = Path(__file__).parent / "data" / "secret_codes.jsonl"


@pytest.mark.slow
def test_smollm2_learns_the_secret_codes(smollm2_dir: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    check = learning_check(smollm2_dir, DATA, tmp_path / "codes")
    meta = check.metadata
    print(
        f"\neval loss {meta['initial_eval_loss']:.3f} -> {meta['eval_loss']:.4f} "
        f"(ppl {meta['eval_perplexity']:.3f}), "
        f"{meta['steps']} steps, {meta['tokens']} tokens, {meta['tokens_per_second']} tok/s, "
        f"train {meta['duration_seconds']:.1f}s, whole test {time.perf_counter() - started:.1f}s"
    )
    assert meta["base_model"] == "SmolLM2-135M-Instruct"
    assert meta["eval_loss"] <= meta["initial_eval_loss"] / 2
    assert check.base.matches == 0, check.base.answers
    assert check.tuned.matches == len(check.tuned.prompts), list(
        zip(check.tuned.answers, check.tuned.expected, strict=True)
    )

    # The same adapter, pushed to the registry and served over real gRPC, answers like PEFT did.
    served_base, served_tuned = serve_and_ask(smollm2_dir, check.output, tmp_path / "registry", check.tuned)
    assert served_base.matches == 0, served_base.answers
    assert served_tuned.matches == len(served_tuned.prompts), served_tuned.answers


def serve_and_ask(base_dir: Path, adapter: Path, registry_dir: Path, asked: ProbeResult) -> tuple:
    """Push ``adapter``, start ``loraswap serve``'s server on 127.0.0.1, ask the base and the adapter."""
    from concurrent.futures import ThreadPoolExecutor

    from loraswap.models import resolve_base
    from loraswap.registry import open_registry
    from loraswap.server.engine import Engine, EngineConfig
    from loraswap.server.engine.api import SamplingParams
    from loraswap.server.grpc.client import Client
    from loraswap.server.grpc.server import GrpcServer
    from loraswap.server.metrics import Metrics
    from loraswap.server.settings import ServeSettings

    manifest = open_registry(registry_dir).push(adapter, "codes", tags=["prod"], base=resolve_base(base_dir))
    assert (
        manifest.training is not None and manifest.training["base_fingerprint"] == manifest.base_fingerprint
    )
    engine_config = EngineConfig(base=str(base_dir), registry=str(registry_dir), max_seq_len=128)
    settings = ServeSettings(engine=engine_config, port=0, metrics_port=-1)
    metrics = Metrics()
    server = GrpcServer(settings, metrics)
    port = server.start()
    engine = Engine(engine_config, observer=metrics)
    engine.start()
    server.attach(engine)
    params = SamplingParams(max_new_tokens=16, stop=("\n",))
    try:
        with Client(f"127.0.0.1:{port}", timeout=300) as client, ThreadPoolExecutor(8) as pool:

            def ask(ref: str) -> ProbeResult:
                calls = [pool.submit(client.generate, p, adapter=ref, sampling=params) for p in asked.prompts]
                return ProbeResult(asked.prompts, asked.expected, [c.result().text for c in calls])

            return ask(""), ask("codes:prod")
    finally:
        server.shutdown(grace=5)
