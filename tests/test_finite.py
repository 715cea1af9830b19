"""The one NaN/Inf scan: the fast op gives the reference op's answer, and every copy was moved to it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from loraswap.finite import all_finite, all_finite_reference

ROOT = Path(__file__).resolve().parents[1]
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)


@pytest.mark.parametrize("dtype", FLOATS)
def test_the_fast_op_matches_the_reference_on_random_data(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        tensor = torch.randn(int(torch.randint(1, 300, (1,), generator=gen)), generator=gen)
        for _ in range(trial % 3):  # 0, 1 or 2 bad values
            where = int(torch.randint(0, tensor.numel(), (1,), generator=gen))
            tensor[where] = (float("nan"), float("inf"), float("-inf"))[trial % 3]
        if dtype in (torch.float16, torch.float8_e4m3fn) and trial % 7 == 0:
            tensor[0] = 1e6  # beyond float16's range: Inf (or NaN, float8_e4m3fn has no Inf) once cast
        cast = tensor.to(dtype)
        assert all_finite(cast) == all_finite_reference(cast), (trial, cast)


def test_shapes_views_and_non_floats() -> None:
    matrix = torch.randn(8, 6)
    matrix[3, 5] = float("nan")
    assert not all_finite(matrix) and not all_finite(matrix.T) and all_finite(matrix[:3])
    assert all_finite(torch.tensor(1.0)) and not all_finite(torch.tensor(float("inf")))
    assert all_finite(torch.zeros(0, 4)) and all_finite_reference(torch.zeros(0, 4))
    for tensor in (torch.arange(5), torch.ones(3, dtype=torch.bool), torch.tensor([255], dtype=torch.uint8)):
        assert all_finite(tensor) and all_finite_reference(tensor)


def test_no_other_nan_scan_remains() -> None:
    """``isfinite(...).all()`` only in the reference op (tests and benches may check their own results)."""
    scan = re.compile(r"isfinite\(")
    found = [
        str(path.relative_to(ROOT))
        for folder in ("loraswap", "registry", "server", "trainer")
        for path in (ROOT / folder).rglob("*.py")
        if scan.search(path.read_text().replace("math.isfinite(", ""))
    ]
    assert found == ["loraswap/finite.py"]
