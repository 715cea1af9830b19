"""The compute precision the hardware runs natively, chosen once and said in one line.

Every place that defaults a dtype (the served base, its adapter slots and KV cache, routes, plain-LoRA
training, the demo, the benches) asks :func:`default_precision` instead of assuming bf16:

- **CPU**: bf16 where the kernels torch and oneDNN will use run it natively (AVX512_BF16 or AMX), fp32
  everywhere else. Without native bf16 every bf16 matmul goes through conversion paths several times
  slower than fp32 (``bench/RESULTS.md``, "Precision chosen by the hardware"). What counts is what the
  kernels will use, not only what the CPU has: ``ATEN_CPU_CAPABILITY`` limits torch's own vectorised
  kernels and ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) limits oneDNN's matmuls, so either one
  set below AVX-512 bf16 makes a bf16-capable CPU an fp32 one.
- **CUDA**: bf16 from compute capability 8.0 (Ampere) on; fp16 on older cards (T4, V100), which emulate
  bf16. A bitsandbytes base (NF4, int8) computes in that dtype.

An explicit flag always wins; :meth:`Precision.describe` is the one line a command logs at start.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""Precision names → torch dtypes."""

NAMES = {dtype: name for name, dtype in DTYPES.items()}

ONEDNN_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# oneDNN's ISA limits (``dnnl::cpu_isa`` names) below which its matmuls have no native bf16 instructions.
# AVX2_VNNI_2 converts to and from bf16 but multiplies in fp32, which is no faster than fp32 itself.
_ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@dataclass(frozen=True)
class Precision:
    """A compute precision and why it was chosen.

    Attributes:
        name: ``bf16``, ``fp16`` or ``fp32``.
        reason: Why, in a few words (``this CPU has no native bf16``).
        native_bf16: Whether the device runs bf16 natively (so an explicit bf16 is fast there too).
    """

    name: str
    reason: str
    native_bf16: bool

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def describe(self) -> str:
        """The one line a command logs at start: ``precision: fp32 (this CPU has no native bf16)``."""
        return f"precision: {self.name} ({self.reason})"


def explicit(name: str, source: str, hardware: Precision) -> Precision:
    """The precision ``name`` set by ``source`` (a flag), with a warning in its reason where it is bf16 on
    a device without native bf16."""
    reason = f"set by {source}"
    if name == "bf16" and not hardware.native_bf16:
        reason += f"; {hardware.reason}, so bf16 runs several times slower than fp32 here"
    return Precision(name, reason, hardware.native_bf16)


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether torch's and oneDNN's CPU kernels will run bf16 natively here, and why (not)."""
    return _cpu_bf16_support(
        torch.backends.cpu.get_cpu_capability(),
        _cpu_bf16_flag(),
        next((os.environ[k] for k in ONEDNN_ISA_ENV if os.environ.get(k)), None),
    )


def _cpu_bf16_flag() -> str | None:
    """``AMX`` or ``AVX512_BF16`` where the CPU has it (x86), ``BF16`` on an Arm CPU oneDNN runs bf16 on,
    else None."""
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        if torch.cpu._is_amx_tile_supported():
            return "AMX"
        return "AVX512_BF16" if torch.cpu._is_avx512_bf16_supported() else None
    return "BF16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def _cpu_bf16_support(capability: str, flag: str | None, onednn_isa: str | None) -> tuple[bool, str]:
    """The rule of :func:`cpu_bf16_support` on its three readings: torch's CPU capability (which follows
    ``ATEN_CPU_CAPABILITY``), the CPU's bf16 feature, and oneDNN's ISA limit (None: no limit)."""
    if flag is None:
        return False, "this CPU has no native bf16"
    if flag != "BF16" and not capability.upper().startswith("AVX512"):
        return False, f"torch's CPU kernels are limited to {capability} (ATEN_CPU_CAPABILITY)"
    if onednn_isa is not None and onednn_isa.strip().upper() in _ONEDNN_WITHOUT_BF16:
        return False, f"oneDNN is limited to {onednn_isa.strip().upper()} (ONEDNN_MAX_CPU_ISA)"
    return True, f"this CPU runs bf16 natively ({flag})"


def cuda_bf16_support(capability: tuple[int, int]) -> tuple[bool, str]:
    """Whether a CUDA device of compute ``capability`` runs bf16 natively (8.0, Ampere, and newer)."""
    major, minor = capability
    if major >= 8:
        return True, f"compute capability {major}.{minor} runs bf16 natively"
    return False, f"compute capability {major}.{minor} has no native bf16"


@functools.cache
def default_precision(device: torch.device) -> Precision:
    """The fastest exact precision ``device`` runs natively (read once per device): bf16 where bf16 is
    native, else fp32 on CPU and fp16 on CUDA."""
    if device.type == "cuda":
        from loraswap.device import cuda_capability

        native, reason = cuda_bf16_support(cuda_capability(device))
        return Precision("bf16" if native else "fp16", reason, native)
    if device.type == "cpu":
        native, reason = cpu_bf16_support()
        return Precision("bf16" if native else "fp32", reason, native)
    return Precision("fp32", f"{device.type} devices compute in fp32 by default", False)
