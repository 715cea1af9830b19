"""The precision chosen by the hardware (``loraswap.precision``), and where serve and train apply it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraswap import precision
from loraswap.errors import InvalidArgumentError
from loraswap.precision import Precision, cuda_bf16_support, default_precision, explicit
from loraswap.server.engine.base_loader import choose_precision, compute_dtype
from loraswap.trainer.config import TrainConfig
from loraswap.trainer.model import training_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("capability", "flag", "onednn", "native", "why"),
    [
        ("AVX512", "AMX", None, True, "natively (AMX)"),
        ("AVX512", "AVX512_BF16", "avx512_core_bf16", True, "natively (AVX512_BF16)"),
        ("AVX512", "AVX512_BF16", "ALL", True, "natively"),
        ("AVX2", "AVX512_BF16", None, False, "torch's CPU kernels are limited to AVX2"),
        ("DEFAULT", "AMX", None, False, "limited to DEFAULT (ATEN_CPU_CAPABILITY)"),
        ("AVX512", "AMX", "AVX2", False, "oneDNN is limited to AVX2"),
        ("AVX512", "AVX512_BF16", " avx512_core ", False, "oneDNN is limited to AVX512_CORE"),
        ("AVX512", None, None, False, "this CPU has no native bf16"),
        ("AVX2", None, None, False, "this CPU has no native bf16"),
        ("SVE256", "BF16", None, True, "natively (BF16)"),  # an Arm CPU oneDNN runs bf16 on
    ],
)
def test_cpu_rule(capability: str, flag: str | None, onednn: str | None, native: bool, why: str) -> None:
    got, reason = precision._cpu_bf16_support(capability, flag, onednn)
    assert got is native and why in reason


def test_cuda_rule_bf16_from_ampere_on() -> None:
    assert cuda_bf16_support((8, 0))[0] and cuda_bf16_support((9, 0))[0]
    assert not cuda_bf16_support((7, 5))[0] and not cuda_bf16_support((7, 0))[0]


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()[2:]}


def test_default_agrees_with_the_cpu_flags() -> None:
    """An independent reading: without avx512_bf16 or amx_bf16 in /proc/cpuinfo, the default is fp32."""
    flags = _cpuinfo_flags()
    if flags is None or not {"avx2", "avx512f", "sse4_2"} & flags:
        pytest.skip("not an x86 Linux CPU with /proc/cpuinfo")
    chosen = default_precision(CPU)
    assert chosen.dtype == DTYPES_BY_NAME[chosen.name]
    if not {"avx512_bf16", "amx_bf16"} & flags:
        assert chosen.name == "fp32" and chosen.reason == "this CPU has no native bf16"
        assert not chosen.native_bf16
    elif not os.environ.get("ATEN_CPU_CAPABILITY") and not os.environ.get("ONEDNN_MAX_CPU_ISA"):
        assert chosen.name == "bf16" and chosen.native_bf16


DTYPES_BY_NAME = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.mark.parametrize(
    "env", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"DNNL_MAX_CPU_ISA": "avx2"}]
)
def test_kernels_limited_to_avx2_mean_fp32_on_any_cpu(env: dict[str, str]) -> None:
    """The variables that make a native-bf16 machine stand in for one without are read, whatever the CPU."""
    code = "import torch, loraswap.precision as p; print(p.default_precision(torch.device('cpu')).name)"
    limits = ("ATEN_CPU_CAPABILITY", *precision.ONEDNN_ISA_ENV)
    clean = {k: v for k, v in os.environ.items() if k not in limits}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "fp32"


def test_explicit_choice_wins_and_warns_where_bf16_is_slow() -> None:
    slow = Precision("fp32", "this CPU has no native bf16", False)
    chosen = explicit("bf16", "--quantization", slow)
    assert chosen.name == "bf16" and chosen.dtype == torch.bfloat16
    assert chosen.describe().startswith("precision: bf16 (set by --quantization; this CPU has no native bf16")
    assert "several times slower" in chosen.reason
    fast = Precision("bf16", "this CPU runs bf16 natively (AMX)", True)
    assert explicit("bf16", "--quantization", fast).reason == "set by --quantization"
    assert explicit("fp32", "--dtype", slow).describe() == "precision: fp32 (set by --dtype)"


def test_serve_default_follows_the_hardware() -> None:
    hardware = default_precision(CPU)
    quantization, chosen = choose_precision(None, CPU)
    assert quantization == hardware.name and chosen == hardware
    for name in ("fp32", "bf16", "fp16"):
        assert choose_precision(name, CPU)[0] == name and compute_dtype(name, CPU) == DTYPES_BY_NAME[name]
    # bitsandbytes bases compute in the device's native precision
    assert compute_dtype("nf4", CPU) == compute_dtype("int8", CPU) == hardware.dtype
    assert choose_precision("nf4", CPU)[1].reason.startswith("nf4 weights; ")
    with pytest.raises(InvalidArgumentError, match="unknown quantization 'int3'"):
        choose_precision("int3", CPU)


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-native-bf16"])
def hardware(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Precision:
    """The hardware reading, as each kind of CPU gives it (the rule below it is tested above)."""
    native = request.param
    reading = Precision(*(("bf16", "natively", True) if native else ("fp32", "no native bf16", False)))
    monkeypatch.setattr(precision, "default_precision", lambda device: reading)
    return reading


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32])
def test_training_auto_keeps_the_stored_dtype_only_where_it_runs_natively(
    hardware: Precision, stored: torch.dtype
) -> None:
    chosen = training_precision(TrainConfig(), stored, CPU)
    if stored == torch.float32 or hardware.native_bf16:
        assert chosen.dtype == stored and "as the base is stored" in chosen.reason
    else:
        assert chosen.name == "fp32" and chosen.reason.startswith(
            f"the base is stored in {precision.NAMES[stored]}"
        )
    explicit_bf16 = training_precision(TrainConfig(dtype="bfloat16"), stored, CPU)
    assert explicit_bf16.name == "bf16" and explicit_bf16.reason.startswith("set by --dtype")


def test_training_records_the_precision(tiny_base: Path, tmp_path: Path, capsys) -> None:
    from loraswap.trainer import train

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"}) + "\n" for i in range(4))
    )
    config = TrainConfig(base=str(tiny_base), data=str(data), output=str(tmp_path / "out"), max_steps=1)
    result = train(config)
    chosen = training_precision(config, torch.float32, CPU)  # the tiny base is stored in fp32
    assert result.metadata["precision"] == chosen.name == "fp32"
    assert f"loraswap train: {chosen.describe()}" in capsys.readouterr().err
