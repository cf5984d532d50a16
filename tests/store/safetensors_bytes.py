"""Hand-built safetensors bytes for malformed-file tests (the library would refuse to write them)."""

from __future__ import annotations

import json
import struct


def raw_file(header: dict | bytes, data: bytes, header_len: int | None = None) -> bytes:
    """8-byte little-endian header length (header_len overrides it), header JSON, data buffer."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if header_len is None else header_len) + body + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
