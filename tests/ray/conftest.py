"""The Ray Serve cluster fixture of this folder (built by :mod:`serve_cluster`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_cluster import Cluster, start_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Iterator[Cluster]:
    """One cluster per test module that asks for it (starting one takes most of a minute on 2 cores)."""
    yield from start_cluster(tmp_path_factory.mktemp("ray"), tiny_base)
