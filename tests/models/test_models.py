"""Base-model resolution, the embedded default, fingerprints and the adapter-format helpers."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import tempfile
from pathlib import Path

import pytest

from loraswap.adapter_format import matches_target, parse_adapter_config, parse_lora_key, read_adapter_config
from loraswap.errors import InvalidArgumentError, NotFoundError
from loraswap.models import base_fingerprint, resolve_base
from loraswap.models.embedded import READY_MARK, build_folder


def test_tiny_base_resolves_and_fingerprint_is_stable(tiny_base: Path, other_tiny_base: Path) -> None:
    ref = resolve_base(tiny_base)
    assert ref.path == tiny_base.resolve()
    assert base_fingerprint(tiny_base) == base_fingerprint(tiny_base)
    assert base_fingerprint(tiny_base) != base_fingerprint(other_tiny_base)


def test_fingerprint_ignores_dtype(tiny_base: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert base_fingerprint(tmp_path / "bf16") == base_fingerprint(tiny_base)


def test_resolve_refuses_missing_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not a local folder"):
        resolve_base(tmp_path / "nope")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InvalidArgumentError, match="gpt2"):
        resolve_base(tmp_path / "gpt")


@pytest.mark.slow
def test_embedded_default_converts_once_and_generates(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    umask = _umask()
    assert stat.S_IMODE(smollm2_dir.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in smollm2_dir.iterdir()} == {0o666 & ~umask}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(ids["input_ids"], max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_peft_adapter_parses(make_adapter) -> None:
    folder = make_adapter(r=4, target_modules=("q_proj", "down_proj"), use_rslora=True)
    config, problems = read_adapter_config(folder)
    assert problems == [] and config is not None
    assert config.r == 4 and config.target_modules == ("down_proj", "q_proj")
    assert config.scaling_of("model.layers.0.self_attn.q_proj") == pytest.approx(16.0 / 2.0)


def test_adapter_config_reports_every_problem() -> None:
    config, problems = parse_adapter_config(
        {"peft_type": "IA3", "r": 0, "lora_alpha": -1, "target_modules": [], "use_dora": True}
    )
    assert config is None
    assert len(problems) == 5


def test_parse_lora_key() -> None:
    key = "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"
    assert parse_lora_key(key) == ("model.layers.3.mlp.up_proj", "B")
    assert parse_lora_key("model.layers.3.mlp.up_proj.weight") is None


def test_target_matching_follows_peft_list_rule() -> None:
    module = "model.layers.0.self_attn.q_proj"
    assert matches_target(module, "q_proj") and matches_target(module, "self_attn.q_proj")
    assert matches_target(module, module) and matches_target("q_proj", "q_proj")
    assert not matches_target(module, "proj") and not matches_target("model.layers.0.attn.xq_proj", "q_proj")
    assert not matches_target(module, "layers.0")  # a suffix of dotted names, not a prefix
    config, _ = parse_adapter_config(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["self_attn.q_proj", "down_proj"]}
    )
    assert config.targets(module) and config.targets("model.layers.3.mlp.down_proj")
    assert not config.targets("model.layers.0.self_attn.k_proj") and not config.targets("model.q_proj")
    _, problems = parse_adapter_config(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "q.*"}
    )
    assert problems == ["target_modules is a regex ('q.*'); list the module names explicitly"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _write_id(value: str):
    def write(folder: Path) -> None:
        (folder / "id").write_text(value)

    return write


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
def test_a_built_folder_is_readable_as_the_umask_allows(tmp_path: Path, umask: int) -> None:
    """A shared model cache (or a container running as another user) must be able to read the folder;
    the conversion used ``tempfile.mkdtemp``, whose 0700 stayed on the published folder."""

    def write(folder: Path) -> None:
        (folder / "id").write_text("a")
        handle, temp = tempfile.mkstemp(dir=folder)  # 0600, as save_pretrained writes its weights
        os.close(handle)
        os.rename(temp, folder / "model.safetensors")

    before = os.umask(umask)
    try:
        target = build_folder(tmp_path / "models" / "m", write, {"source": "test"})
    finally:
        os.umask(before)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()}
    assert modes == dict.fromkeys([READY_MARK, "id", "model.safetensors"], 0o666 & ~umask)
    assert json.loads((target / READY_MARK).read_text()) == {"source": "test"}


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_complete_folder_is_kept_and_the_loser_removes_only_its_temp(tmp_path: Path) -> None:
    """The conversion that finished second deleted the first one's folder (which a server may already be
    loading) and put its own in place."""
    target = tmp_path / "models" / "m"
    build_folder(target, _write_id("first"), {})
    inode = target.stat().st_ino
    assert build_folder(target, _write_id("second"), {}) == target
    assert target.stat().st_ino == inode and (target / "id").read_text() == "first"
    assert _entries(target.parent) == [".m.lock", "m"]


def test_an_incomplete_folder_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    target.mkdir(parents=True)
    (target / "id").write_text("half-written")
    build_folder(target, _write_id("whole"), {})
    assert (target / "id").read_text() == "whole" and (target / READY_MARK).is_file()
    assert _entries(target.parent) == [".m.lock", "m"]


def _build_after_barrier(target: str, value: str, barrier, results) -> None:
    def write(folder: Path) -> None:
        (folder / "id").write_text(value)
        barrier.wait(timeout=60)  # both folders are complete before either process publishes

    folder = build_folder(Path(target), write, {})
    results.put((value, str(folder), (folder / "id").read_text()))


def test_two_processes_building_at_once_agree_on_one_folder(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    target = tmp_path / "models" / "m"
    workers = [
        context.Process(target=_build_after_barrier, args=(str(target), value, barrier, results))
        for value in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    got = sorted(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    winner = (target / "id").read_text()
    assert winner in ("a", "b") and (target / READY_MARK).is_file()
    assert got == [("a", str(target), winner), ("b", str(target), winner)]  # both read the winner's folder
    assert _entries(target.parent) == [".m.lock", "m"]  # the loser's temp folder is gone
