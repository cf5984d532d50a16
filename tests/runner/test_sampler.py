"""The sampler's row checks against their plain torch definitions."""

from __future__ import annotations

import pytest
import torch

from peftserve.runner.sampler import finite_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_rows_is_isfinite_all(dtype: torch.dtype) -> None:
    """NaN, +inf and -inf anywhere in a row (first, last, middle, everywhere) make it non-finite, and
    only that row; huge finite values do not."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 1000, generator=gen).to(dtype)
    logits[1, 0] = float("nan")
    logits[2, 999] = float("inf")
    logits[3, 500] = -float("inf")
    logits[4] = float("nan")
    logits[5, 10], logits[5, 20] = float("inf"), -float("inf")
    logits[6, 3] = torch.finfo(dtype).max
    logits[7, 4] = torch.finfo(dtype).min
    logits[8, 0], logits[8, 1] = float("nan"), float("inf")
    expected = torch.isfinite(logits).all(dim=-1)
    assert expected.tolist() == [True, False, False, False, False, False, True, True, False]
    assert torch.equal(finite_rows(logits), expected)
