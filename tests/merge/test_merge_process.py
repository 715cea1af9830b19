"""Merges in a worker process (what route promotion uses): the work runs in another process at a lower
priority, its result and its domain errors come back, and a worker that dies is an error, not a hang."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraswap.errors import InvalidArgumentError
from loraswap.merge.process import MergeWorkerError, merge_in_process, run_in_process
from loraswap.merge.sources import AdapterSource


def test_the_work_runs_in_another_process_at_a_lower_priority() -> None:
    assert run_in_process(os.getpid) != os.getpid()
    assert run_in_process(os.nice, 0) >= os.nice(0) + 1  # the worker's niceness, read in the worker


def test_a_domain_error_comes_back_with_its_class(tiny_base: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()  # no adapter_config.json: refused by the merge, in the worker
    with pytest.raises(InvalidArgumentError, match=r"adapter_config\.json"):
        merge_in_process(tiny_base, [AdapterSource.from_folder(tmp_path / "empty")], tmp_path / "out")


def test_a_worker_that_dies_is_an_error() -> None:
    with pytest.raises(MergeWorkerError, match="exit code 3"):
        run_in_process(os._exit, 3)


def test_a_merge_in_a_worker_writes_the_model(tiny_base: Path, make_adapter, tmp_path: Path) -> None:
    record = merge_in_process(
        tiny_base, [AdapterSource.from_folder(make_adapter(r=4, seed=8))], tmp_path / "m"
    )
    assert (tmp_path / "m" / "config.json").is_file() and len(record.adapters) == 1
