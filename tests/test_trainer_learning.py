"""The embedded SmolLM2 learns a made-up fact table on CPU, and plain PEFT serves what it learned."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from loraswap.trainer.probe import learning_check

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
