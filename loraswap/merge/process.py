"""A merge in a worker process of its own, for a server that merges while it serves (route promotion).

:func:`~loraswap.merge.builder.merge_adapters` reads and writes the whole base (minutes for a large one):
on a thread of the serving process it competes with the engine's step thread for the GIL, and its torch
ops for the cores. :func:`merge_in_process` runs it in a fresh ``spawn`` process at a lower CPU priority
(``nice`` +10) with one torch thread, and hands back its :class:`~loraswap.merge.record.MergeRecord` or
its error (a domain error keeps its class and message).

The worker ends with the merge; it also ends on its own if the server that started it is gone (it checks
its parent every second), and :func:`stop_merges` ends any merge still running when the server stops.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from loraswap.errors import LoraswapError

WORKER_NICE = 10  # the worker's CPU priority below the server's: serving first
PARENT_CHECK_S = 1.0  # how often the worker looks whether its server is still there

_running: set[multiprocessing.process.BaseProcess] = set()
_running_lock = threading.Lock()


class MergeWorkerError(LoraswapError):
    """The merge worker process ended without a result (killed, out of memory)."""


def merge_in_process(*args: Any, **kwargs: Any) -> Any:
    """``merge_adapters(*args, **kwargs)`` in a worker process; its result, or its error raised here.

    Raises:
        MergeWorkerError: the worker ended without answering (its exit code is in the message).
    """
    from loraswap.merge.builder import merge_adapters

    return run_in_process(merge_adapters, *args, **kwargs)


def run_in_process(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh ``spawn`` worker (``fn`` and its arguments must pickle)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(
        target=_work, args=(sender, os.getpid(), fn, args, kwargs), name="loraswap-merge", daemon=True
    )
    worker.start()
    sender.close()
    with _running_lock:
        _running.add(worker)
    try:
        outcome = _wait(receiver, worker)
    finally:
        with _running_lock:
            _running.discard(worker)
        worker.join(timeout=5)
        if worker.is_alive():
            worker.kill()
        receiver.close()
    if outcome is None:
        raise MergeWorkerError(f"the merge worker ended without a result (exit code {worker.exitcode})")
    ok, value = outcome
    if not ok:
        raise value
    return value


def stop_merges() -> None:
    """End every merge worker still running (the server is stopping)."""
    with _running_lock:
        workers = list(_running)
    for worker in workers:
        with contextlib.suppress(Exception):
            worker.kill()


def _wait(receiver: Connection, worker: multiprocessing.process.BaseProcess) -> tuple[bool, Any] | None:
    while not receiver.poll(0.2):
        if not worker.is_alive() and not receiver.poll(0):
            return None
    try:
        return receiver.recv()
    except EOFError:
        return None


def _work(sender: Connection, parent: int, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """The worker's body: lower priority, one torch thread, a parent watch, then ``fn``."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    from loraswap.device import serial_torch_thread

    serial_torch_thread()
    try:
        result: tuple[bool, Any] = (True, fn(*args, **kwargs))
    except Exception as exc:  # sent to the server, which raises it in the promoting thread
        result = (False, exc if _pickles(exc) else MergeWorkerError(f"{type(exc).__name__}: {exc}"))
    sender.send(result)
    sender.close()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)  # the server is gone: nobody waits for this merge


def _pickles(exc: BaseException) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return False
    return True
