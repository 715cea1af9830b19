"""The one module that touches ``torch.cuda`` (engine, trainer, metrics): device choice, memory figures,
random-number state; and which threads run torch's CPU ops in parallel (:func:`serial_torch_thread`)."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
from pathlib import Path

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pick_device(requested: str | None) -> torch.device:
    """``requested`` if given, else CUDA when available, else CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not cuda_available():
            from loraswap.errors import InvalidArgumentError

            raise InvalidArgumentError(f"device {requested!r} asked for, but CUDA is not available")
        return device
    return torch.device("cuda") if cuda_available() else torch.device("cpu")


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability (major, minor) of a CUDA device."""
    return torch.cuda.get_device_capability(device)


def cuda_rng_states() -> list[torch.Tensor] | None:
    """The RNG state of every CUDA device (None without CUDA), for checkpoints."""
    return torch.cuda.get_rng_state_all() if cuda_available() else None


def set_cuda_rng_states(states: list[torch.Tensor] | None) -> None:
    """Restore :func:`cuda_rng_states` (ignored without CUDA or without saved states)."""
    if states is not None and cuda_available():
        torch.cuda.set_rng_state_all(states)


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(used, total) bytes of a CUDA device; None on CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free, total


def device_allocated_bytes(device: torch.device) -> int:
    """Bytes held by torch's allocator on a CUDA device (0 on CPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def host_rss_bytes() -> int:
    """Resident set size of this process (from /proc when available)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes(device: torch.device) -> int:
    """Memory that new allocations can take: free bytes of a CUDA device, or the host's available RAM
    (``MemAvailable`` of /proc/meminfo, else free physical pages) on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def empty_device_cache(device: torch.device) -> None:
    """Give the CUDA caching allocator's unused blocks back to the device (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def release_freed_host_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim(0)``); whether it did.

    Replacing a model's weights at start-up (packed oneDNN copies, fused groups, fp16 weights) frees the
    originals, but glibc keeps freed chunks of a grown heap for reuse, and they stay in the process's RSS:
    on SmolLM2 in fp32 about 485 MiB after packing. Called once the engine is built. Without glibc (musl,
    macOS) nothing happens.
    """
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's CPU ops run on (libgomp in torch's CPU builds, or an Intel/LLVM one),
    as loaded into this process; None where none is found (no ``/proc``, or a build without OpenMP)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for fields in map(str.split, maps):
        if fields and any(name in Path(fields[-1]).name for name in ("libgomp", "libiomp", "libomp")):
            return ctypes.CDLL(fields[-1])
    return None


def serial_torch_thread() -> None:
    """Run the calling thread's torch CPU ops on the thread alone, so that it never makes an OpenMP team.

    With OpenMP (torch's CPU builds), each thread that runs a parallel op keeps a team of worker threads
    for the rest of its life. Once a process has more OpenMP threads than CPUs, libgomp stops spinning
    between parallel regions and every op of every team pays for putting its workers to sleep and waking
    them (``bench/RESULTS.md``, "One OpenMP team"). The engine's step thread is the one that should run
    ops in parallel; every other long-lived thread that touches torch (the server's main thread while it
    loads the model, adapter loads, route builds) calls this first. It must come before the thread's first
    parallel op: a team, once made, stays. It sets only the calling thread's OpenMP thread count; torch's
    own setting (``torch.get_num_threads()`` in other threads) is unchanged.
    """
    set_thread_torch_threads(1)


def set_thread_torch_threads(threads: int) -> None:
    """The calling thread's torch CPU ops use ``threads`` threads (1: no OpenMP team, see
    :func:`serial_torch_thread`); other threads and ``torch.get_num_threads()`` elsewhere are unchanged.
    Without an OpenMP runtime found, nothing changes."""
    torch.get_num_threads()  # torch's per-thread set-up of the OpenMP thread count runs once, first
    runtime = _openmp_runtime()
    if runtime is not None:
        runtime.omp_set_num_threads(threads)
