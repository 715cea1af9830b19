"""Reading adapter folders into host tensors: checks made once per recipe, data checked every time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraswap.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_key
from loraswap.errors import AdapterValidationError, IncompatibleAdapterError
from loraswap.server.adapters.reader import AdapterReader, BaseShape

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
BASE = BaseShape(modules={Q: (16, 16), V: (16, 8)}, max_rank=8, fingerprint="tiny")


def _write(folder: Path, seed: int, r: int = 4, alpha: float = 8.0, dtype=torch.float32, **config) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (in_f, out_f) in BASE.modules.items():
        tensors[lora_key(module, "A")] = torch.randn(r, in_f, generator=gen).to(dtype)
        tensors[lora_key(module, "B")] = torch.randn(out_f, r, generator=gen).to(dtype)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    doc = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"], **config}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(doc))
    return folder


def _slot_view(reader: AdapterReader, folder: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What a slot receives for ``module``: A and the scaled B^T."""
    host = reader.read(folder, folder.name, "sha256:" + folder.name)
    a, bt = host.modules[module]
    return a, bt * host.scales.get(module, 1.0)


def _expected(folder: Path, module: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    return tensors[lora_key(module, "A")], tensors[lora_key(module, "B")].T * scale


def test_adapters_of_one_recipe_share_a_plan_and_keep_their_own_weights(tmp_path: Path) -> None:
    reader = AdapterReader(BASE, torch.float32)
    folders = [_write(tmp_path / f"a{i}", seed=i) for i in range(3)]
    for folder in folders:
        for module in (Q, V):
            a, bt = _slot_view(reader, folder, module)
            want_a, want_bt = _expected(folder, module, 8.0 / 4)
            assert torch.equal(a, want_a) and torch.equal(bt, want_bt)
    assert len(reader._plans) == 1


def test_the_same_header_with_another_config_gets_its_own_scaling(tmp_path: Path) -> None:
    reader = AdapterReader(BASE, torch.float32)
    plain = _write(tmp_path / "plain", seed=1, alpha=8.0)
    louder = _write(tmp_path / "louder", seed=1, alpha=32.0)
    rs = _write(tmp_path / "rs", seed=1, alpha=8.0, use_rslora=True)
    patterned = _write(tmp_path / "pattern", seed=1, alpha=8.0, alpha_pattern={"v_proj": 2.0})
    assert (plain / ADAPTER_WEIGHTS).read_bytes() == (louder / ADAPTER_WEIGHTS).read_bytes()
    cases = [(plain, 2.0, 2.0), (louder, 8.0, 8.0), (rs, 4.0, 4.0), (patterned, 2.0, 0.5)]
    for folder, q_scale, v_scale in cases:
        for module, scale in ((Q, q_scale), (V, v_scale)):
            assert torch.allclose(_slot_view(reader, folder, module)[1], _expected(folder, module, scale)[1])
    assert len(reader._plans) == 4


def test_remembered_plans_are_bounded(tmp_path: Path) -> None:
    reader = AdapterReader(BASE, torch.float32, max_plans=2)
    for alpha in (1.0, 2.0, 3.0):
        reader.read(_write(tmp_path / f"x{alpha}", seed=0, alpha=alpha), "x", "sha256:x")
    assert len(reader._plans) == 2


def test_a_cached_plan_never_skips_the_data_check(tmp_path: Path) -> None:
    reader = AdapterReader(BASE, torch.float32)
    reader.read(_write(tmp_path / "good", seed=0), "good", "sha256:good")
    bad = _write(tmp_path / "bad", seed=0)
    tensors = load_file(str(bad / ADAPTER_WEIGHTS))
    tensors[lora_key(V, "B")][3, 1] = float("nan")
    save_file(tensors, str(bad / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterValidationError, match="NaN") as info:
        reader.read(bad, "bad", "sha256:bad")
    assert info.value.problems == [f"{V}: weights contain NaN or Inf"]
    assert len(reader._plans) == 1  # the same recipe: only the data differed


def test_refusals_stand_on_every_read(tmp_path: Path) -> None:
    reader = AdapterReader(BASE, torch.float32)
    too_big = _write(tmp_path / "big", seed=0, r=16, alpha=16.0)
    for _ in range(2):
        with pytest.raises(IncompatibleAdapterError, match="max rank 8"):
            reader.read(too_big, "big", "sha256:big")
    lying = _write(tmp_path / "lying", seed=0)
    doc = json.loads((lying / ADAPTER_CONFIG).read_text())
    (lying / ADAPTER_CONFIG).write_text(json.dumps({**doc, "r": 2}))
    for _ in range(2):
        with pytest.raises(AdapterValidationError, match="expected"):
            reader.read(lying, "lying", "sha256:lying")
    with pytest.raises(IncompatibleAdapterError, match="made for base other"):
        reader.read(_write(tmp_path / "ok", seed=0), "ok", "sha256:ok", fingerprint="other")


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
def test_slot_dtype_conversion_folds_the_scaling_in(tmp_path: Path, file_dtype) -> None:
    reader = AdapterReader(BASE, torch.bfloat16)
    folder = _write(tmp_path / "a", seed=0, dtype=file_dtype)
    host = reader.read(folder, "a", "sha256:a")
    a, bt = _slot_view(reader, folder, Q)
    want_a, want_bt = _expected(folder, Q, 2.0)
    assert a.dtype == bt.dtype == torch.bfloat16
    assert torch.equal(a, want_a.to(torch.bfloat16))
    assert torch.allclose(bt.float(), want_bt.float(), rtol=1e-2, atol=1e-2)
    assert (host.scales == {}) == (file_dtype != torch.bfloat16)  # converted copies carry the scaling
    if file_dtype == torch.bfloat16:  # views of the file's bytes, as read
        assert host.nbytes == (folder / ADAPTER_WEIGHTS).stat().st_size
    else:  # one packed buffer of the converted matrices
        assert host.nbytes == sum(a.numel() + bt.numel() for a, bt in host.modules.values()) * 2


def test_keys_that_name_the_adapter_are_read_as_written(tmp_path: Path) -> None:
    """``...lora_A.default.weight`` (an adapter name in the key) is a valid PEFT key: the reader pairs
    A and B by the keys the file holds, not by a spelling it assumes."""
    folder = _write(tmp_path / "a", seed=0)
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    named = {k.removesuffix(".weight") + ".default.weight": t for k, t in tensors.items()}
    save_file(named, str(folder / ADAPTER_WEIGHTS))
    host = AdapterReader(BASE, torch.float32).read(folder, "a", "sha256:a")
    for module in (Q, V):
        a, bt = host.modules[module]
        assert torch.equal(a, tensors[lora_key(module, "A")])
        assert torch.equal(bt * host.scales[module], tensors[lora_key(module, "B")].T * 2.0)


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
def test_damage_to_the_cache_file_in_place_never_reaches_a_host_copy(tmp_path: Path, file_dtype) -> None:
    """Defect (found by the chaos soak): the host tier mapped the cache file, and a private mapping shows
    what is written into the file in place, so damage to a cached file (an editor, a disk fault) changed
    a served adapter (wrong answers), and truncating it killed the server with SIGBUS on its next use."""
    reader = AdapterReader(BASE, torch.bfloat16)
    folder = _write(tmp_path / "a", seed=0, dtype=file_dtype)
    host = reader.read(folder, "a", "sha256:a")
    before = {m: (a.clone(), bt.clone()) for m, (a, bt) in host.modules.items()}
    weights = folder / ADAPTER_WEIGHTS
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:  # overwrite every byte past the header, in place
        handle.seek(size // 2)
        handle.write(bytes([0x7F]) * (size - size // 2))
    assert all(
        torch.equal(a, before[m][0]) and torch.equal(bt, before[m][1]) for m, (a, bt) in host.modules.items()
    )
    os.truncate(weights, 8)  # and cut it short: touching a mapped page past the end would be SIGBUS
    assert all(torch.equal(a, before[m][0]) for m, (a, _) in host.modules.items())
