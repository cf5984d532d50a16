"""Request checks the engine applies whatever front door a request came through."""

from __future__ import annotations

import math

import pytest

from peftserve.engine.request import (
    MAX_MIXTURE_WEIGHT,
    AdapterRef,
    FinishReason,
    RequestOutput,
    check_adapter_refs,
    merged,
)
from peftserve.errors import InvalidRequest


@pytest.mark.parametrize(
    ("refs", "match"),
    [
        ((AdapterRef("t/a", math.nan),), "must be a number in"),
        ((AdapterRef("t/a", math.inf),), "must be a number in"),
        ((AdapterRef("t/a", 3e38),), r"\[-10, 10\], got 3e\+38"),
        ((AdapterRef("t/a", -MAX_MIXTURE_WEIGHT * 1.01),), "must be a number in"),
        ((AdapterRef("t/a"), AdapterRef("t/a", 0.5)), "once"),
        (tuple(AdapterRef(f"t/a{i}") for i in range(9)), "at most 8"),
    ],
)
def test_bad_adapter_lists_are_invalid(refs: tuple[AdapterRef, ...], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        check_adapter_refs(refs)


def test_weights_within_the_documented_range_pass() -> None:
    check_adapter_refs(())
    check_adapter_refs((AdapterRef("t/a", MAX_MIXTURE_WEIGHT), AdapterRef("t/b", -MAX_MIXTURE_WEIGHT)))


def test_a_long_adapter_id_is_quoted_not_echoed() -> None:
    with pytest.raises(InvalidRequest) as err:
        check_adapter_refs((AdapterRef("t/" + "x" * 10_000, 1e9),))
    assert len(str(err.value)) < 300 and "10002 characters" in str(err.value)


def test_merged_increments_read_as_one() -> None:
    first = RequestOutput("r", "ab", (97, 98), (-1.0, -2.0), 4, 2, cached_tokens=1)
    last = RequestOutput("r", "c", (99,), (-3.0,), 4, 3, FinishReason.LENGTH, cached_tokens=1)
    assert merged([first]) is first
    assert merged([first, last]) == RequestOutput(
        "r", "abc", (97, 98, 99), (-1.0, -2.0, -3.0), 4, 3, FinishReason.LENGTH, cached_tokens=1
    )
    plain = [RequestOutput("r", t, (i,), None, 4, i + 1) for i, t in enumerate("xyz")]
    assert merged(plain) == RequestOutput("r", "xyz", (0, 1, 2), None, 4, 3)
