"""Registry validation: every rule with a real bad file, all problems reported in one error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraswap.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLE_WEIGHTS, read_adapter_config
from loraswap.errors import AdapterValidationError, InvalidArgumentError
from loraswap.models import resolve_base
from loraswap.models.fingerprint import weight_shapes
from loraswap.registry import base_compat_problems, open_registry, parse_ref, validate_adapter_dir
from loraswap.registry.names import LATEST

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture
def adapter(make_adapter, tmp_path: Path) -> Path:
    """A private, writable copy of a valid PEFT adapter (r=8, q_proj + v_proj)."""
    return Path(shutil.copytree(make_adapter(), tmp_path / "adapter"))


def _edit_config(folder: Path, **changes) -> None:
    path = folder / ADAPTER_CONFIG
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / ADAPTER_WEIGHTS
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _problems(folder: Path, **kwargs) -> list[str]:
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter_dir(folder, **kwargs)
    return info.value.problems


def test_valid_peft_adapter_is_summarised(adapter: Path) -> None:
    summary = validate_adapter_dir(adapter)
    assert summary.files == ("README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    assert summary.config.r == 8 and summary.config.target_modules == ("q_proj", "v_proj")
    assert summary.dtype == "float32"
    assert summary.training is None
    assert Q_A in summary.tensor_shapes


def test_other_files_are_ignored(adapter: Path) -> None:
    (adapter / "optimizer.pt").write_bytes(b"x")
    (adapter / "checkpoint-10").mkdir()
    summary = validate_adapter_dir(adapter)
    assert "optimizer.pt" not in summary.files
    assert summary.ignored == ("checkpoint-10", "optimizer.pt")


def test_pickle_weights_are_refused_with_conversion_hint(adapter: Path) -> None:
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    torch.save(tensors, adapter / PICKLE_WEIGHTS)
    (adapter / ADAPTER_WEIGHTS).unlink()
    [problem] = _problems(adapter)
    assert "pickle" in problem and "safetensors.torch.save_file" in problem


def test_bad_json_config(adapter: Path) -> None:
    (adapter / ADAPTER_CONFIG).write_text('{"r": 8,')
    assert any("not valid JSON" in p for p in _problems(adapter))


def test_wrong_rank(adapter: Path) -> None:
    _edit_config(adapter, r=4, lora_alpha=8)
    problems = _problems(adapter)
    assert any("lora_A has shape [8, 64], expected [r=4" in p for p in problems)
    assert any("lora_B has shape" in p and "r=4" in p for p in problems)


def test_rank_pattern_is_honoured(adapter: Path) -> None:
    _edit_config(adapter, r=4, rank_pattern={"q_proj": 8, "v_proj": 8})
    assert validate_adapter_dir(adapter).config.rank_of("model.layers.0.self_attn.q_proj") == 8
    _edit_config(adapter, r=8, rank_pattern={"q_proj": 4})
    assert any("q_proj: lora_A has shape [8, 64], expected [r=4" in p for p in _problems(adapter))


def test_missing_b(adapter: Path) -> None:
    _edit_tensors(adapter, lambda t: t.pop(Q_B))
    assert any("q_proj: lora_B is missing" in p for p in _problems(adapter))


def test_nan_and_inf(adapter: Path) -> None:
    def poison(tensors: dict) -> None:
        tensors[Q_A][0, 0] = float("nan")
        tensors[Q_B][0, 0] = float("inf")

    _edit_tensors(adapter, poison)
    problems = _problems(adapter)
    assert sum("NaN or Inf" in p for p in problems) == 2


def test_unsupported_and_untargeted_modules(adapter: Path) -> None:
    _edit_config(adapter, target_modules=["q_proj", "fc1"])
    problems = _problems(adapter)
    assert any("target module 'fc1' is not supported" in p for p in problems)
    assert any("v_proj: module 'v_proj' is not in target_modules" in p for p in problems)


def test_dotted_targets_match_by_suffix_in_the_adapter_and_the_base(adapter: Path, tiny_base: Path) -> None:
    _edit_config(adapter, target_modules=["self_attn.q_proj", "self_attn.v_proj"])
    validate_adapter_dir(adapter, base=resolve_base(tiny_base))
    _edit_config(adapter, target_modules=["mlp.q_proj", "self_attn.v_proj"])
    problems = _problems(adapter, base=resolve_base(tiny_base))
    assert "target module 'mlp.q_proj' does not exist in the base model" in problems
    assert any("self_attn.q_proj: module 'q_proj' is not in target_modules" in p for p in problems)


def test_stray_tensor(adapter: Path) -> None:
    _edit_tensors(adapter, lambda t: t.update({"lm_head.weight": torch.zeros(2, 2)}))
    assert any("lm_head.weight is not a LoRA weight" in p for p in _problems(adapter))


def test_oversize(adapter: Path) -> None:
    assert any("over the 1000-byte limit" in p for p in _problems(adapter, max_bytes=1000))


def test_not_safetensors(adapter: Path) -> None:
    (adapter / ADAPTER_WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    assert any("not a readable safetensors file" in p for p in _problems(adapter))


def test_bad_training_metadata(adapter: Path) -> None:
    (adapter / "training_metadata.json").write_text("[1, 2")
    assert any("training_metadata.json is not valid JSON" in p for p in _problems(adapter))


def test_all_problems_in_one_error(adapter: Path) -> None:
    _edit_config(adapter, target_modules=["q_proj", "v_proj", "fc1"])
    _edit_tensors(adapter, lambda t: t.pop(Q_B))
    (adapter / "training_metadata.json").write_text("nope")
    problems = _problems(adapter, max_bytes=10)
    assert len(problems) >= 4


def test_base_match_and_mismatch(adapter: Path, tiny_base: Path, other_tiny_base: Path) -> None:
    validate_adapter_dir(adapter, base=resolve_base(tiny_base))
    problems = _problems(adapter, base=resolve_base(other_tiny_base))
    assert any("q_proj: lora_A has in_features=64, the base has 96" in p for p in problems)
    assert any("v_proj: lora_B" in p for p in problems)


def test_base_compat_problems_is_reusable(adapter: Path, tiny_base: Path, other_tiny_base: Path) -> None:
    config, _ = read_adapter_config(adapter)
    shapes = validate_adapter_dir(adapter).tensor_shapes
    assert base_compat_problems(config, shapes, weight_shapes(tiny_base)) == []
    assert base_compat_problems(config, shapes, weight_shapes(other_tiny_base))
    no_layer = {k: v for k, v in weight_shapes(tiny_base).items() if "layers.0.self_attn.q_proj" not in k}
    assert any("no such linear layer" in p for p in base_compat_problems(config, shapes, no_layer))


@pytest.mark.parametrize("name", ["../x", "a/b", "UPPER", "-lead", ".", "..", "", "x" * 65, "a b", "a:b"])
def test_bad_names_are_refused(adapter: Path, name: str) -> None:
    with pytest.raises(AdapterValidationError, match="invalid adapter name"):
        open_registry().push(adapter, name)


@pytest.mark.parametrize("tag", ["../x", "a/b", ".hidden", "-x", "", "t" * 129, "a:b", "a@b"])
def test_bad_tags_are_refused(adapter: Path, tag: str) -> None:
    with pytest.raises(AdapterValidationError, match="invalid tag"):
        open_registry().push(adapter, "ok", tags=[tag])


def test_bad_name_and_bad_adapter_in_one_error(adapter: Path) -> None:
    (adapter / ADAPTER_CONFIG).write_text("{")
    with pytest.raises(AdapterValidationError) as info:
        open_registry().push(adapter, "../x", tags=["../y"])
    assert len(info.value.problems) == 3


def test_references() -> None:
    assert parse_ref("a") == parse_ref(f"a:{LATEST}")
    assert parse_ref("a:Prod-1").tag == "Prod-1"
    digest = "sha256:" + "0" * 64
    assert parse_ref(f"a@{digest}").digest == digest
    for bad in ("a@sha256:xyz", "../a", "a:../b", "a@" + "0" * 64, ""):
        with pytest.raises(InvalidArgumentError):
            parse_ref(bad)
