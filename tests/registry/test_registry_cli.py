"""``loraswap registry …`` through ``loraswap.cli.main``: exit codes, output and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from loraswap.cli import main


@pytest.fixture
def registry_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"file://{tmp_path / 'reg'}"
    monkeypatch.setenv("LORASWAP_REGISTRY", url)
    return url


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["registry", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _digest(out: str) -> str:
    return out.split("@", 1)[1].split()[0]


def test_push_show_list_pull(registry_url, make_adapter, tiny_base: Path, tmp_path: Path, capsys) -> None:
    adapter = shutil.copytree(make_adapter(), tmp_path / "a")
    (adapter / "training_metadata.json").write_text(json.dumps({"dataset": "faq", "metrics": {"loss": 0.5}}))
    code, out, _ = _run(
        capsys, "push", str(adapter), "--name", "bot", "--tag", "prod", "--base", str(tiny_base),
        "--description", "FAQ bot",
    )  # fmt: skip
    assert code == 0 and out.startswith("pushed bot@sha256:") and "tags: latest, prod" in out
    digest = _digest(out)
    code, out, _ = _run(capsys, "show", "bot:prod")
    assert code == 0 and digest in out and "FAQ bot" in out and '"dataset": "faq"' in out
    assert "q_proj, v_proj" in out and "8 / 16.0" in out
    code, out, _ = _run(capsys, "show", "bot", "--json")
    shown = json.loads(out)
    assert shown["digest"] == digest and shown["training"]["metrics"] == {"loss": 0.5}
    assert shown["base"]["fingerprint"].startswith("sha256:")
    code, out, _ = _run(capsys, "list")
    assert code == 0 and "bot" in out and "latest,prod" in out
    code, out, _ = _run(capsys, "list", "bot", "--json")
    assert [row["tags"] for row in json.loads(out)] == [["latest", "prod"]]
    code, out, _ = _run(capsys, "pull", "bot:prod", str(tmp_path / "out"))
    assert code == 0 and out.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "training_metadata.json").read_bytes() == (
        adapter / "training_metadata.json"
    ).read_bytes()


def test_registry_option_overrides_env(make_adapter, tmp_path: Path, capsys) -> None:
    url = str(tmp_path / "explicit")
    assert _run(capsys, "--registry", url, "push", str(make_adapter()), "--name", "bot")[0] == 0
    assert _run(capsys, "list", "--registry", url)[1].count("bot") == 1
    assert (tmp_path / "explicit" / "adapters" / "bot").is_dir()


def test_validation_error_is_one_reason_and_exit_1(registry_url, make_adapter, tmp_path, capsys) -> None:
    adapter = shutil.copytree(make_adapter(), tmp_path / "a")
    (adapter / "adapter_config.json").write_text("{")
    code, out, err = _run(capsys, "push", str(adapter), "--name", "../x")
    assert code == 1 and out == ""
    assert err.startswith("loraswap: error: cannot push") and "invalid adapter name" in err
    assert "adapter_config.json is not valid JSON" in err


def test_base_mismatch_is_refused(registry_url, make_adapter, other_tiny_base: Path, capsys) -> None:
    code, _, err = _run(capsys, "push", str(make_adapter()), "--name", "bot", "--base", str(other_tiny_base))
    assert code == 1 and "the base has 96" in err


def test_max_bytes(registry_url, make_adapter, capsys) -> None:
    code, _, err = _run(capsys, "push", str(make_adapter()), "--name", "bot", "--max-bytes", "100")
    assert code == 1 and "over the 100-byte limit" in err


def test_unknown_references(registry_url, capsys) -> None:
    code, _, err = _run(capsys, "show", "nope")
    assert code == 1 and err.strip() == f"loraswap: error: adapter 'nope' not found in {registry_url}"
    assert _run(capsys, "pull", "../x", "dest")[0] == 1
    code, _, err = _run(capsys, "untag", "nocolon")
    assert code == 1 and "NAME:TAG" in err


def test_tag_untag_rm_force(registry_url, make_adapter, capsys) -> None:
    _run(capsys, "push", str(make_adapter()), "--name", "bot")
    code, out, _ = _run(capsys, "tag", "bot", "prod")
    assert code == 0 and "as bot:prod" in out
    code, _, err = _run(capsys, "rm", "bot:prod")
    assert code == 1 and "is tagged latest, prod; untag it or use --force" in err
    assert _run(capsys, "untag", "bot:prod")[0] == 0
    assert _run(capsys, "untag", "bot:prod")[0] == 1
    code, out, _ = _run(capsys, "rm", "bot", "--force")
    assert code == 0 and out.startswith("removed bot@sha256:")
    assert _run(capsys, "list", "bot")[0] == 1


def test_gc_and_verify(registry_url, make_adapter, tmp_path: Path, capsys) -> None:
    _run(capsys, "push", str(make_adapter()), "--name", "bot")
    _run(capsys, "rm", "bot", "--force")
    code, out, _ = _run(capsys, "gc")
    assert code == 0 and out.startswith("removed 0 blobs") and "kept 3" in out
    blobs = Path(registry_url.removeprefix("file://")) / "blobs" / "sha256"
    for blob in blobs.iterdir():
        os.utime(blob, (time.time() - 7200,) * 2)
    code, out, _ = _run(capsys, "gc", "--grace", "3600")
    assert code == 0 and out.startswith("removed 3 blobs")
    _run(capsys, "push", str(make_adapter()), "--name", "bot")
    code, out, _ = _run(capsys, "verify")
    assert code == 0 and out.strip().endswith(": ok")
    blob = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    code, out, err = _run(capsys, "verify")
    assert code == 1 and "is corrupt" in out and "problems in" in err


def test_help_reads_well(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["registry", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for action in ("push", "pull", "list", "show", "tag", "untag", "rm", "gc", "verify", "--registry"):
        assert action in out
