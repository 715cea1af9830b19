"""The prepared GPU check on CPU: its dry run (wheels, what travels, the repository's inputs), its step
runner (failures, overruns and the deadline reported, the table still printed last), and the CUDA bench
code run at toy sizes on CPU, so that GPU time is not the first time it runs."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from bench.gpu import check, cuda_bench, report
from bench.gpu.wheels import (
    TRAVEL_LIMIT,
    WHEELS,
    folder_bytes,
    normalize,
    travel_problems,
    wheel_problems,
)


def write_wheel(folder: Path, dist: str, version: str, tags: str = "py3-none-any") -> Path:
    """A wheel archive as the check reads it: a top-level dist-info with METADATA and, as setuptools'
    real wheel has, a vendored package's dist-info below it (no payload)."""
    stem = normalize(dist).replace("-", "_")
    path = folder / f"{stem}-{version}-{tags}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{stem}/_vendor/zipp-3.23.0.dist-info/METADATA", "Name: zipp\nVersion: 3.23.0\n")
        archive.writestr(
            f"{stem}-{version}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        )
        archive.writestr(f"{stem}-{version}.dist-info/WHEEL", f"Wheel-Version: 1.0\nTag: {tags}\n")
    return path


def prepared(folder: Path) -> Path:
    folder.mkdir()
    for dist, version in WHEELS.items():
        tags = "py3-none-manylinux_2_24_x86_64" if dist == "bitsandbytes" else "py3-none-any"
        write_wheel(folder, dist, version, tags)
    return folder


def test_missing_wheels_are_each_named_and_a_prepared_folder_passes(tmp_path: Path) -> None:
    assert wheel_problems(tmp_path / "absent") == [
        f"wheel folder {tmp_path / 'absent'} does not exist (run `make gpu-wheels`)"
    ]
    (tmp_path / "empty").mkdir()
    problems = wheel_problems(tmp_path / "empty")
    assert problems == [f"missing wheel: {d}=={v} (run `make gpu-wheels`)" for d, v in WHEELS.items()]
    assert wheel_problems(prepared(tmp_path / "ready")) == []


def test_wrong_python_platform_version_or_content_is_named(tmp_path: Path) -> None:
    folder = prepared(tmp_path / "w")
    (folder / "pluggy-1.7.0-py3-none-any.whl").unlink()
    write_wheel(folder, "pluggy", "1.7.0", "cp311-cp311-manylinux_2_28_x86_64")
    (folder / "iniconfig-2.3.1-py3-none-any.whl").unlink()
    write_wheel(folder, "iniconfig", "2.3.1", "py3-none-macosx_11_0_arm64")
    (folder / "pygments-2.21.0-py3-none-any.whl").unlink()
    write_wheel(folder, "pygments", "2.20.0")
    (folder / "pytest-9.2.0-py3-none-any.whl").write_bytes(b"truncated download")
    write_wheel(folder, "nvidia-ml-py", "13.0.0")
    (folder / "notes.txt").write_text("x")
    problems = wheel_problems(folder)
    assert (
        "pluggy-1.7.0-cp311-cp311-manylinux_2_28_x86_64.whl: python tag cp311 is not for CPython 3.12"
        in problems
    )
    assert any(p.startswith("iniconfig-2.3.1-py3-none-macosx_11_0_arm64.whl: platform") for p in problems)
    assert "pygments-2.20.0-py3-none-any.whl: version 2.20.0, the check installs pygments==2.21.0" in problems
    assert any(p.startswith("pytest-9.2.0-py3-none-any.whl: not a readable wheel") for p in problems)
    assert any(p.startswith("2 wheels of nvidia-ml-py") for p in problems)
    assert "unexpected file in w: notes.txt" in problems
    assert not any("bitsandbytes" in p or "setuptools" in p for p in problems)


def test_more_than_the_travel_limit_is_a_problem(tmp_path: Path) -> None:
    big = tmp_path / "carry" / "big.whl"
    big.parent.mkdir()
    with open(big, "wb") as handle:  # sparse: no disk used
        handle.truncate(TRAVEL_LIMIT - 1000)
    assert folder_bytes(big.parent) == TRAVEL_LIMIT - 1000
    assert travel_problems(folder_bytes(big.parent), 999)[1] == []
    _, problems = travel_problems(folder_bytes(big.parent), 1001)
    assert len(problems) == 1 and "over the 64 MiB that may travel" in problems[0]


def test_dry_run_of_the_repository_fails_only_on_the_missing_wheels(tmp_path: Path, capsys) -> None:
    code = check.main(["--dry-run", "--wheels", str(tmp_path / "none"), "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[-1] == "dry run: NOT ready: wheels"
    for name in ("travel size", "out files", "test paths", "budgets", "entry points", "model config"):
        assert f"ok   {name}" in out
    assert "tests/server/engine/test_engine_gpu.py" in out and "1.236 B params" in out
    rows = check.input_checks(
        check.ROOT, prepared(tmp_path / "ready"), check.PRESETS["gpu"], tmp_path / "work"
    )
    assert all(ok for _, ok, _ in rows), rows


def test_only_brings_the_steps_it_needs(tmp_path: Path) -> None:
    steps = check.plan(check.ROOT, tmp_path / "out", tmp_path / "work", check.PRESETS["gpu"], "cuda")
    assert [s.name for s in check.select(steps, "bench-bf16", "")] == [
        "install",
        "probe",
        "model",
        "bench-bf16",
    ]
    assert [s.name for s in check.select(steps, "ops", "install")] == ["probe", "ops"]
    with pytest.raises(SystemExit, match="unknown step"):
        check.select(steps, "bench-fp8", "")


def test_failures_and_overruns_are_reported_and_the_table_comes_last(tmp_path: Path, capsys) -> None:
    py = [sys.executable, "-c"]
    steps = [
        check.Step("fails", 30, [*py, "import sys; print('ValueError: bad input'); sys.exit(3)"]),
        check.Step("needs-it", 30, [*py, "pass"], needs=("fails",)),
        check.Step("overruns", 1, [*py, "import time; print('working', flush=True); time.sleep(60)"]),
        check.Step("beside", 30, [*py, "open('done', 'w').close()"], background=True),
        check.Step("after-it", 30, [*py, "import os; assert os.path.exists('done')"], after=("beside",)),
    ]
    out, work = tmp_path / "out", tmp_path / "work"
    results = check.run(steps, tmp_path, out, work, tmp_path, deadline_s=300, header={"device": "cpu"})
    got = {r.name: (r.status, r.note) for r in results}
    assert got["fails"] == ("FAIL", "ValueError: bad input")
    assert got["needs-it"] == ("skipped", "needs fails")
    assert got["overruns"][0] == "TIMEOUT" and got["overruns"][1].startswith("stopped at 1 s")
    assert got["beside"][0] == "ok" and got["after-it"][0] == "ok"
    assert [r.name for r in results] == ["fails", "needs-it", "overruns", "beside", "after-it"]
    printed = capsys.readouterr().out
    table = (out / "table.txt").read_text()
    assert printed.endswith(table) and printed.splitlines()[-1].split()[:2] == ["after-it", "ok"]
    assert "NOT A GPU RESULT" in table
    saved = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in saved["steps"]] == [r.name for r in results]
    log = (out / "steps.log").read_text()
    assert "===== overruns: TIMEOUT" in log and "working" in log
    assert len(os.listdir(out)) <= check.OUT_LIMIT


def test_steps_past_the_deadline_are_skipped(tmp_path: Path) -> None:
    steps = [check.Step("late", 30, [sys.executable, "-c", "open('ran', 'w').close()"])]
    results = check.run(steps, tmp_path, tmp_path / "out", tmp_path / "w", tmp_path, check.MIN_STEP_S - 1, {})
    assert [(r.status, r.note) for r in results] == [("skipped", "no time left before the deadline")]
    assert not (tmp_path / "ran").exists()


def test_test_summaries_from_junit_and_from_a_log_cut_short(tmp_path: Path) -> None:
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.server.engine.test_engine_gpu" name="test_a"/>'
        '<testcase classname="tests.server.engine.test_engine_gpu" name="test_b"><failure/></testcase>'
        '<testcase classname="tests.server.engine.test_engine_gpu" name="test_c"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = report.junit_summary(junit)
    assert summary["note"] == "1 passed, 1 failed, 0 errors, 1 skipped: test_engine_gpu::test_b"
    log = (
        "tests/server/lora/test_lora_ops.py::test_x PASSED [ 10%]\n"
        "tests/server/lora/test_lora_ops.py::test_y[nf4] FAILED [ 20%]\n"
        "tests/server/engine/test_engine.py::test_slow \n"
    )
    summary = report.log_summary(log)
    assert summary["note"] == (
        "1 passed, 1 failed, 0 errors, 0 skipped: test_lora_ops.py::test_y[nf4]; "
        "was running test_engine.py::test_slow"
    )


def test_probe_problems_name_each_broken_check() -> None:
    found = {
        "device": "cuda",
        "cuda_available": False,
        "nf4_linear": {"ok": True, "finite": True},
        "nvml_metrics": {"ok": False, "error": "NVMLError_LibraryNotFound: NVML Shared Library Not Found"},
        "staged_fill": {"ok": True, "exact": False},
    }
    assert cuda_bench.probe_problems(found) == [
        "torch sees no CUDA device",
        "nvml_metrics: NVMLError_LibraryNotFound: NVML Shared Library Not Found",
        "staged_fill: exact is false",
    ]
    assert (
        cuda_bench.probe_problems(
            {"device": "cpu", "cuda_available": False, "staged_fill": {"ok": True, "exact": True}}
        )
        == []
    )


def test_the_bench_steps_run_at_toy_sizes_on_cpu(tmp_path: Path) -> None:
    """The model, ops and engine subcommands as the check calls them, on CPU with the tiny model."""
    common = [
        "--work",
        str(tmp_path),
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--adapters",
        "2",
        "--activation",
        "1",
    ]
    assert cuda_bench.main(["model", "--json", str(tmp_path / "model.json"), *common]) == 0
    assert (
        cuda_bench.main(
            ["ops", "--json", str(tmp_path / "ops.json"), *common, "--batches", "1,2", "--op-slots", "2"]
        )
        == 0
    )
    engine = [
        "--requests",
        "2",
        "--new-tokens",
        "2",
        "--rounds",
        "1",
        "--context",
        "4",
        "--max-seq-len",
        "64",
    ]
    assert (
        cuda_bench.main(
            ["engine", "--json", str(tmp_path / "e.json"), *common, "--quantization", "bf16", *engine]
        )
        == 0
    )
    model = json.loads((tmp_path / "model.json").read_text())
    ops = json.loads((tmp_path / "ops.json").read_text())
    bench = json.loads((tmp_path / "e.json").read_text())
    assert model["adapters"]["mixed"] == 2 and model["model"]["params"] > 0
    assert set(ops["ops"]["us"]) == {"q_proj/o_proj", "k_proj/v_proj", "gate_proj/up_proj", "down_proj"}
    assert set(ops["ops"]["us"]["down_proj"]) == {"auto", "bgmv", "sgmv", "grouped"}
    assert all(v > 0 for row in ops["ops"]["us"]["down_proj"].values() for v in row.values())
    assert not [k for k, v in bench.items() if isinstance(v, dict) and "error" in v]
    assert set(bench["tok_s"]) == {"mixed", "one", "base"} and all(v > 0 for v in bench["tok_s"].values())
    assert bench["decode_step"]["mixed_wall_s"] > 0 and set(bench["slot_fill"]) == {
        "staged_s",
        "per_matrix_s",
    }
    assert (
        bench["memory"]["per_slot_bytes"] * bench["memory"]["slots"] == bench["memory"]["slot_buffers_bytes"]
    )
    text = report.table({"device": "cpu", "model": model, "ops": ops, "bench-bf16": bench, "steps": []})
    assert "NOT A GPU RESULT" in text and "tok/s mixed / one adapter / base" in text
    assert "ms (2 layers, batch 2)" in text
