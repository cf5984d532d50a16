"""The hand-written safetensors check: each malformed file is refused with its problem named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from peftserve.errors import AdapterRejected
from peftserve.store.safetensors_header import MAX_HEADER_BYTES, check_safetensors
from tests.store.safetensors_bytes import entry, raw_file

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def test_library_files_pass() -> None:
    data = save(
        {
            A: torch.zeros(2, 8),
            B: torch.zeros(8, 2, dtype=torch.bfloat16),
            "x.shira_indices": torch.zeros(2, 3, dtype=torch.int32),
        }
    )
    assert {e.name for e in check_safetensors(data)} == {A, B, "x.shira_indices"}


CASES = [
    ("empty", b"", "truncated"),
    ("seven-bytes", b"\x01" * 7, "truncated"),
    ("eight-bytes", raw_file(b"", b"", header_len=0), "not valid"),
    ("mid-header", raw_file({A: entry("F32", [2], 0, 8)}, b"\0" * 8)[:20], "runs past the end"),
    ("mid-data", raw_file({A: entry("F32", [2], 0, 8)}, b"\0" * 8)[:-3], "run past the data buffer"),
    ("header-too-large", raw_file(b"{}", b"", header_len=1 << 40), "exceeds the limit"),
    ("header-over-cap", raw_file(b"{}", b"", header_len=MAX_HEADER_BYTES + 1), "exceeds the limit"),
    ("not-json", raw_file(b"{nope", b""), "not valid"),
    ("not-utf8", raw_file(b"\xff\xfe", b""), "not JSON"),
    ("not-object", raw_file(b"[1, 2]", b""), "not a JSON object"),
    ("deep", raw_file(b"[" * 100000 + b"]" * 100000, b""), "not"),
    ("out-of-range", raw_file({A: entry("F32", [4], 0, 16)}, b"\0" * 8), "run past the data buffer"),
    ("reversed", raw_file({A: entry("F32", [2], 8, 0)}, b"\0" * 8), "reversed"),
    (
        "overlap",
        raw_file({A: entry("F32", [2], 0, 8), B: entry("F32", [2], 4, 12)}, b"\0" * 12),
        "overlaps",
    ),
    ("gap", raw_file({A: entry("F32", [1], 4, 8)}, b"\0" * 8), "gap of 4 bytes"),
    ("trailing", raw_file({A: entry("F32", [1], 0, 4)}, b"\0" * 8), "belong to none"),
    ("size-vs-shape", raw_file({A: entry("F32", [3], 0, 8)}, b"\0" * 8), "needs 12"),
    ("dtype-f64", raw_file({A: entry("F64", [1], 0, 8)}, b"\0" * 8), "dtype 'F64'"),
    ("dtype-bool", raw_file({A: entry("BOOL", [8], 0, 8)}, b"\0" * 8), "dtype 'BOOL'"),
    ("int-weights", raw_file({A: entry("I32", [2], 0, 8)}, b"\0" * 8), "dtype 'I32'"),
    (
        "duplicate",
        raw_file(
            b'{"%s": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            b'"%s": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}' % (A.encode(), A.encode()),
            b"\0" * 8,
        ),
        "duplicate tensor name",
    ),
    ("bad-entry", raw_file({A: {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "exactly"),
    ("negative-shape", raw_file({A: entry("F32", [-1], 0, 4)}, b"\0" * 4), "shape"),
    ("bad-metadata", raw_file({"__metadata__": {"a": 1}}, b""), "__metadata__"),
    ("garbage", bytes(range(256)) * 4, "exceeds the limit"),
]


@pytest.mark.parametrize(("data", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_files_are_refused(data: bytes, needle: str) -> None:
    with pytest.raises(AdapterRejected, match="adapter_model.safetensors") as info:
        check_safetensors(data)
    assert needle in str(info.value), str(info.value)


def test_shira_indices_may_be_integers() -> None:
    header = {"m.shira_indices": entry("I64", [2, 1], 0, 16), "m.shira_weight": entry("F32", [1], 16, 20)}
    assert len(check_safetensors(raw_file(header, b"\0" * 20))) == 2
    assert json.loads(json.dumps(header))  # the header itself is plain JSON
