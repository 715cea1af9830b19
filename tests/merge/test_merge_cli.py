"""``loraswap merge`` on the command line: a real subprocess, one-line errors, a merge killed halfway."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraswap.cli import main
from loraswap.devtools.tiny import build_tiny_llama
from loraswap.merge import RECORD_FILE, MergeRecord
from loraswap.models import base_fingerprint, resolve_base
from loraswap.registry import open_registry


def cli(*argv: str, **options) -> subprocess.CompletedProcess[str]:
    """``python -m loraswap.cli ARGV`` in a subprocess (the environment as the test set it)."""
    return subprocess.run(
        [sys.executable, "-m", "loraswap.cli", *argv], capture_output=True, text=True, check=False, **options
    )


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["merge", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_merge_registry_and_folder_adapters_then_push(tiny_base: Path, make_adapter, tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'reg'}"
    registry = open_registry(url)
    pushed = registry.push(make_adapter(seed=3), "bot", tags=["prod"], base=resolve_base(tiny_base))
    folder = make_adapter(r=4, seed=4)
    out = tmp_path / "merged"
    result = cli(
        "merge", "--base", str(tiny_base), "--adapter", "bot:prod", "--adapter", str(folder),
        "--method", "cat", "--weights", "0.7,0.3", "--output", str(out), "--dtype", "bf16",
        "--push", "bot-merged:v1", "--registry", url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        f"merged bot@{pushed.digest} x0.7, " in result.stdout
        and "(cat, bfloat16, 4 weights)" in result.stdout
    )
    record = MergeRecord.from_file(out)
    assert [a.ref for a in record.adapters] == ["bot:prod", str(folder)]
    assert [a.source for a in record.adapters] == ["registry", "folder"]
    assert record.adapters[0].digest == pushed.digest and record.adapters[1].digest.startswith("sha256:")
    assert record.base_fingerprint == base_fingerprint(tiny_base) and record.dtype == "bfloat16"
    model = registry.resolve_model("bot-merged:v1")
    assert f"pushed bot-merged@{model.digest}" in result.stdout
    assert [a.digest for a in model.lineage.adapters] == list(record.adapter_digests)


def test_one_line_errors_and_nothing_left(tiny_base: Path, make_adapter, tmp_path: Path, capsys) -> None:
    adapter = str(make_adapter())
    capsys.readouterr()  # the fixture's own output
    outs = tmp_path / "outs"
    cases = [
        (["--adapter", adapter, "--method", "median"], "unknown merge method 'median'"),
        (
            ["--adapter", adapter, "--adapter", adapter, "--weights", "1,x"],
            "--weights expects comma-separated",
        ),
        (["--adapter", adapter, "--majority-sign", "total"], "elects no signs: --majority-sign is not used"),
        (["--adapter", adapter, "--seed", "3"], "draws no random masks: --seed is not used"),
        (["--adapter", adapter, "--push", "Bad Name"], "invalid adapter name 'Bad Name'"),
        (["--adapter", "ghost:v1", "--registry", f"file://{tmp_path / 'reg'}"], "adapter 'ghost' not found"),
        (["--adapter", adapter, "--adapter", adapter, "--method", "ties"], "needs a density"),
    ]
    for argv, message in cases:
        code, out, err = run_main(capsys, "--base", str(tiny_base), "--output", str(outs / "m"), *argv)
        assert code == 1 and err.startswith("loraswap: error: ") and message in err, (argv, err)
        assert "Traceback" not in err and not outs.exists()
    (outs / "m").mkdir(parents=True)
    (outs / "m" / "x").write_text("keep")
    code, _, err = run_main(
        capsys, "--base", str(tiny_base), "--adapter", adapter, "--output", str(outs / "m")
    )
    assert code == 1 and "is not empty (use --force to replace it)" in err
    assert sorted(os.listdir(outs)) == ["m"] and os.listdir(outs / "m") == ["x"]
    code, out, _ = run_main(
        capsys,
        "--base",
        str(tiny_base),
        "--adapter",
        adapter,
        "--output",
        str(outs / "m"),
        "--force",
        "--quiet",
    )
    assert code == 0 and "(linear, float32, 4 weights)" in out
    assert sorted(os.listdir(outs)) == ["m"] and (outs / "m" / RECORD_FILE).is_file()


@pytest.fixture(scope="module")
def deep_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with 16 layers: enough tensors that the merge's per-tensor log outgrows a pipe page."""
    return build_tiny_llama(tmp_path_factory.mktemp("deep-llama"), num_layers=16)


@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs Linux pipes (F_SETPIPE_SZ)")
def test_merge_killed_halfway_leaves_no_complete_folder(
    deep_base: Path, make_adapter, tmp_path: Path, capsys
) -> None:
    adapter = make_adapter(base=deep_base)
    out = tmp_path / "merged"
    read_end, write_end = os.pipe()
    page = fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, 4096)  # the child blocks once a page is unread
    tensors = 16 * 9 + 3
    line = len("INFO loraswap.merge.builder: tensor 100/147 model.layers.10.mlp.up_proj.weight (copied)")
    assert tensors * line > 2 * page + 256  # the log past the first line (+ what we read) cannot fit the pipe
    child = subprocess.Popen(
        [sys.executable, "-m", "loraswap.cli", "-v", "merge", "--base", str(deep_base),
         "--adapter", str(adapter), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=write_end,
    )  # fmt: skip
    os.close(write_end)
    seen = b""
    try:
        while f"tensor 1/{tensors} ".encode() not in seen:  # the merge has started writing tensors
            chunk = os.read(read_end, 256)
            assert chunk, f"the merge ended before it started: {seen.decode(errors='replace')}"
            seen += chunk
        # the child is now stopped on a full pipe somewhere in the tensors (or still before it)
        child.kill()
        child.wait()
    finally:
        os.close(read_end)
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not out.exists()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert left and all(not (p / RECORD_FILE).exists() and not (p / "config.json").exists() for p in left)
    code, _, _ = run_main(capsys, "--base", str(deep_base), "--adapter", str(adapter), "--output", str(out))
    assert code == 0 and (out / RECORD_FILE).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]  # the dead merge's is gone
    assert json.loads((out / RECORD_FILE).read_text())["merged_modules"] == 32
