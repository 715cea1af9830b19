"""Bad merges: every refusal names its reason and leaves no output folder and no temporary folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraswap.errors import (
    AdapterValidationError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    LoraswapError,
    NotFoundError,
)
from loraswap.merge import RECORD_FILE, merge_adapters, resolve_adapter
from loraswap.models import base_fingerprint
from loraswap.registry import open_registry


@pytest.fixture
def outs(tmp_path: Path) -> Path:
    """A parent folder for outputs that does not exist yet: after a refusal it must still not exist."""
    return tmp_path / "outs"


def assert_nothing_left(outs: Path) -> None:
    assert not outs.exists()


def refused(outs: Path, error: type[LoraswapError], *args, **kwargs) -> LoraswapError:
    with pytest.raises(error) as info:
        merge_adapters(*args, **kwargs)
    assert_nothing_left(outs)
    return info.value


def scaled_adapter(adapter: Path, out: Path, factor: float, layer: str = "layers.1.") -> Path:
    """A copy of ``adapter`` whose tensors of ``layer`` are multiplied by ``factor`` (still finite)."""
    shutil.copytree(adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    for key in tensors:
        if layer in key:
            tensors[key] = tensors[key] * factor
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    save_file(tensors, out / "adapter_model.safetensors")
    return out


@pytest.mark.parametrize(
    ("kwargs", "n", "message"),
    [
        ({"method": "average"}, 2, "unknown merge method 'average'"),
        ({"method": "cat", "weights": [1.0]}, 2, "1 weights given for 2 adapters"),
        ({"method": "cat", "weights": [1.0, float("nan")]}, 2, "weights must be finite numbers, got nan"),
        ({"method": "linear", "weights": [float("inf"), 1.0]}, 2, "got inf"),
        ({"method": "ties"}, 2, "needs a density"),
        ({"method": "ties", "density": 0.0}, 2, "density must be in (0, 1], got 0.0"),
        ({"method": "dare_linear", "density": 1.5}, 2, "density must be in (0, 1], got 1.5"),
        ({"method": "ties", "density": float("nan")}, 2, "density must be in (0, 1]"),
        ({"method": "linear", "density": 0.5}, 2, "density is not used"),
        (
            {"method": "ties", "density": 0.5},
            1,
            "combines several adapters; one adapter merges with 'linear'",
        ),
        ({"method": "svd"}, 1, "combines several adapters"),
        ({"method": "linear", "svd_rank": 4}, 2, "svd rank is not used"),
        ({"method": "svd", "svd_rank": 0}, 2, "svd rank must be a positive integer"),
        ({"method": "svd", "svd_clamp": 2.0}, 2, "svd clamp must be a quantile in (0, 1]"),
        ({"method": "ties", "density": 0.5, "majority_sign": "mean"}, 2, "majority sign must be one of"),
        ({"dtype": "int8"}, 1, "dtype must be bf16, fp16 or fp32"),
    ],
)
def test_bad_parameters(tiny_base, make_adapter, outs: Path, kwargs, n: int, message: str) -> None:
    sources = [resolve_adapter(make_adapter(seed=s)) for s in range(3, 3 + n)]
    error = refused(outs, InvalidArgumentError, tiny_base, sources, outs / "m", **kwargs)
    assert message in str(error)


def test_every_parameter_problem_at_once(tiny_base, make_adapter, outs: Path) -> None:
    sources = [resolve_adapter(make_adapter(seed=3)), resolve_adapter(make_adapter(seed=4))]
    error = refused(
        outs, InvalidArgumentError, tiny_base, sources, outs / "m", method="ties", weights=[1.0], svd_rank=2
    )
    assert len(error.problems) == 3  # weights count, density missing, svd rank not used


def test_adapters_for_another_base_every_reason(
    tiny_base, other_tiny_base, make_adapter, outs: Path, tmp_path: Path
) -> None:
    good = resolve_adapter(make_adapter())
    registry = open_registry(f"file://{tmp_path / 'reg'}")
    registry.push(make_adapter(base=other_tiny_base), "wide", base=_ref(other_tiny_base))
    wide = resolve_adapter("wide", registry)
    local_wide = resolve_adapter(make_adapter(base=other_tiny_base, seed=5))
    error = refused(
        outs, IncompatibleAdapterError, tiny_base, [good, wide, local_wide], outs / "m", method="cat"
    )
    text = str(error)
    assert f"made for base {base_fingerprint(other_tiny_base)}" in text  # the registry's binding
    assert "'wide'" in text and "lora_A has in_features=96, the base has 64" in text
    assert sum(1 for p in error.problems if p.startswith("adapter 'wide'")) > 1
    assert not any(p.startswith(f"adapter {good.ref!r}") for p in error.problems)
    assert any(local_wide.ref in p for p in error.problems)  # the folder adapter's shape problems too


def _ref(folder: Path):
    from loraswap.models import resolve_base

    return resolve_base(folder)


def test_trainer_recorded_fingerprint_of_another_base(
    tiny_base, make_adapter, outs: Path, tmp_path: Path
) -> None:
    adapter = shutil.copytree(make_adapter(), tmp_path / "trained")
    other = "sha256:" + "0" * 64
    (adapter / "training_metadata.json").write_text(json.dumps({"base_fingerprint": other}))
    error = refused(outs, IncompatibleAdapterError, tiny_base, [resolve_adapter(adapter)], outs / "m")
    assert f"it was made for base {other}, not {base_fingerprint(tiny_base)}" in str(error)


def test_unequal_ranks_refused_where_the_method_needs_equal_ones(tiny_base, make_adapter, outs: Path) -> None:
    sources = [resolve_adapter(make_adapter(r=4)), resolve_adapter(make_adapter(r=8, seed=4))]
    for method, extra in (("linear", {}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.5})):
        error = refused(outs, InvalidArgumentError, tiny_base, sources, outs / "m", method=method, **extra)
        assert f"method {method!r} combines the A and B matrices entry by entry" in str(error)
        assert "has rank 8 where adapter" in str(error) and "has rank 4" in str(error)
        assert "'cat' (exact) or an *_svd method" in str(error)
    merge_adapters(tiny_base, sources, outs / "cat", method="cat")  # cat and svd take any ranks
    merge_adapters(tiny_base, sources, outs / "svd", method="svd")


def test_different_targets_refused_where_the_method_needs_the_same(
    tiny_base, make_adapter, outs: Path
) -> None:
    sources = [
        resolve_adapter(make_adapter(target_modules=("q_proj", "v_proj"))),
        resolve_adapter(make_adapter(target_modules=("q_proj", "up_proj"), seed=4)),
    ]
    error = refused(
        outs, InvalidArgumentError, tiny_base, sources, outs / "m", method="magnitude_prune", density=0.5
    )
    assert "lacks model.layers.0.self_attn.v_proj" in str(
        error
    ) and "targets model.layers.0.mlp.up_proj" in str(error)
    record = merge_adapters(tiny_base, sources, outs / "cat", method="cat")
    assert record.merged_modules == 6  # q (both), v (first), up (second), in 2 layers


def test_non_finite_merge_in_a_later_tensor_leaves_nothing(
    tiny_base, make_adapter, outs: Path, tmp_path: Path
) -> None:
    huge = scaled_adapter(make_adapter(), tmp_path / "huge", 1e30)  # B @ A overflows fp32 in layer 1 only
    error = refused(outs, InvalidArgumentError, tiny_base, [resolve_adapter(huge)], outs / "m")
    assert "merging produced NaN or Inf in model.layers.1.self_attn.q_proj.weight" in str(error)


def test_non_finite_after_the_cast_to_fp16(tiny_base, make_adapter, outs: Path) -> None:
    source = resolve_adapter(make_adapter())
    error = refused(outs, InvalidArgumentError, tiny_base, [source], outs / "m", weights=[1e6], dtype="fp16")
    assert "does not fit float16" in str(error) and "choose a wider --dtype" in str(error)
    assert merge_adapters(tiny_base, [source], outs / "m", weights=[1e6], dtype="fp32").dtype == "float32"


def test_invalid_adapter_folder(tiny_base, make_adapter, outs: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(make_adapter(), tmp_path / "broken")
    (broken / "adapter_model.safetensors").unlink()
    error = refused(outs, AdapterValidationError, tiny_base, [resolve_adapter(broken)], outs / "m")
    assert "adapter_model.safetensors is missing" in str(error)


def test_quantized_base_refused(tiny_base, make_adapter, outs: Path, tmp_path: Path) -> None:
    base = shutil.copytree(tiny_base, tmp_path / "nf4")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    error = refused(outs, InvalidArgumentError, base, [resolve_adapter(make_adapter())], outs / "m")
    assert "is a bitsandbytes checkpoint: merging needs the unquantized weights" in str(error)


def test_missing_adapter_references(tmp_path: Path) -> None:
    registry = open_registry(f"file://{tmp_path / 'reg'}")
    with pytest.raises(NotFoundError, match="adapter 'nothing' not found"):
        resolve_adapter("nothing:v1", registry)
    with pytest.raises(NotFoundError, match=re.escape("adapter folder ./no/such/folder does not exist")):
        resolve_adapter("./no/such/folder", registry)
    with pytest.raises(InvalidArgumentError, match="neither a folder nor a registry reference"):
        resolve_adapter("Not A Ref", registry)


def test_a_merged_model_reference_is_not_an_adapter(tiny_base, make_adapter, tmp_path: Path) -> None:
    merge_adapters(tiny_base, [resolve_adapter(make_adapter())], tmp_path / "m")
    registry = open_registry(f"file://{tmp_path / 'reg'}")
    registry.push_model(tmp_path / "m", "merged:v1")
    with pytest.raises(InvalidArgumentError, match="is a merged model, not an adapter"):
        resolve_adapter("merged:v1", registry)


def test_non_empty_output_needs_force_and_is_replaced_only_when_complete(
    tiny_base, make_adapter, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    source = resolve_adapter(make_adapter())
    with pytest.raises(InvalidArgumentError, match="is not empty \\(use --force to replace it\\)"):
        merge_adapters(tiny_base, [source], out)
    huge = resolve_adapter(scaled_adapter(make_adapter(), tmp_path / "huge", 1e30))
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        merge_adapters(tiny_base, [huge], out, force=True)
    assert sorted(os.listdir(out)) == ["keep.txt"]  # a failed forced merge keeps the old folder
    merge_adapters(tiny_base, [source], out, force=True)
    assert (out / RECORD_FILE).is_file() and not (out / "keep.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["home", "huge", "out"]  # no temporary or replaced folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    merge_adapters(tiny_base, [source], empty)  # an empty folder is taken without --force
    assert (empty / RECORD_FILE).is_file()


def test_output_that_is_a_file_a_link_or_an_input(tiny_base, make_adapter, tmp_path: Path) -> None:
    source = resolve_adapter(make_adapter())
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    with pytest.raises(InvalidArgumentError, match="exists and is not a folder"):
        merge_adapters(tiny_base, [source], tmp_path / "file", force=True)
    with pytest.raises(InvalidArgumentError, match="is a symbolic link"):
        merge_adapters(tiny_base, [source], tmp_path / "link", force=True)
    with pytest.raises(InvalidArgumentError, match="would replace the input"):
        merge_adapters(tiny_base, [source], source.path, force=True)
    assert (source.path / "adapter_model.safetensors").is_file()


def test_stale_temporary_folder_of_a_dead_merge_is_removed(tiny_base, make_adapter, tmp_path: Path) -> None:
    stale = tmp_path / ".out.merging-999999999-abc"  # above any pid_max: no such process
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    merge_adapters(tiny_base, [resolve_adapter(make_adapter())], tmp_path / "out")
    assert not stale.exists() and (tmp_path / "out" / RECORD_FILE).is_file()
