"""bench/precision_ab on the tiny model: every variant in its own process, and the summary's ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import precision_ab

pytestmark = pytest.mark.slow


def test_precision_ab_runs_each_variant_and_reports_ratios(tiny_base: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.json"
    argv = ["--base", str(tiny_base), "--rounds", "1", "--adapters", "2", "--requests", "3"]
    argv += ["--new-tokens", "2", "--variants", "default,bf16", "--out", str(out)]
    assert precision_ab.main(argv) == 0
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 1
    for variant in ("default", "bf16"):
        for case in ("base", "1 adapter", "2 adapters"):
            assert report["tok_s"][variant][case] > 0
    first = report["rounds"][0]
    assert first["bf16"]["quantization"] == "bf16" and first["bf16"]["precision"].startswith(
        "precision: bf16"
    )
    assert first["default"]["precision"].startswith("precision: ")
    assert set(report["default_vs_best_explicit"]) == {"base", "1 adapter", "2 adapters"}
    assert "default vs best explicit, 2 adapters" in capsys.readouterr().out


def test_summary_takes_medians_and_the_best_explicit_per_round() -> None:
    rounds = [
        {"default": {"base": 10.0}, "fp32": {"base": 10.0}, "bf16": {"base": 5.0}},
        {"default": {"base": 9.0}, "fp32": {"base": 12.0}, "bf16": {"base": 4.0}},
        {"default": {"base": 8.0}, "fp32": {"base": 8.0}, "bf16": {"base": 16.0}},
    ]
    summary = precision_ab.summarize(rounds, ["default", "fp32", "bf16"])
    assert summary["tok_s"]["default"]["base"] == 9.0 and summary["tok_s"]["bf16"]["base"] == 5.0
    assert summary["default_vs_best_explicit"]["base"] == 0.75  # median of 1.0, 0.75, 0.5
