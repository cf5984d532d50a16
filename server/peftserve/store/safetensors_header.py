"""A hand-written check of a safetensors file's raw bytes, run before the safetensors library sees them.

Format: 8 bytes little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?: {str: str}}``, then the data
buffer; offsets are relative to the buffer and must tile it exactly (no gap, no overlap, no trailing bytes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from peftserve.errors import AdapterRejected, quote

MAX_HEADER_BYTES = 16 << 20
"""A header larger than this is refused before it is read (adapter headers are kilobytes)."""
FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
INDEX_DTYPES = {"I32": 4, "I64": 8}
INDEX_TENSOR_SUFFIXES = ("shira_indices",)
"""Tensors that may hold integers (SHiRA's row/column indices); every other tensor is floating point."""
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    """Byte range in the data buffer: [begin, end)."""


def _reject(file: str, problem: str) -> AdapterRejected:
    return AdapterRejected(f"{file}: {problem}")


def _unique_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate tensor name {quote(dupes[0])}")
    return dict(pairs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(file: str, name: str, raw: object, data_len: int) -> TensorEntry:
    if not isinstance(raw, dict) or set(raw) != ENTRY_KEYS:
        raise _reject(file, f"tensor {quote(name)}: header entry must have exactly {sorted(ENTRY_KEYS)}")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    allowed = FLOAT_DTYPES | (INDEX_DTYPES if name.endswith(INDEX_TENSOR_SUFFIXES) else {})
    if dtype not in allowed:
        raise _reject(
            file, f"tensor {quote(name)}: dtype {quote(dtype)} is not allowed (allowed: {', '.join(allowed)})"
        )
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) for d in shape):
        raise _reject(file, f"tensor {quote(name)}: shape {quote(shape)} is not a list of at most 8 sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise _reject(file, f"tensor {quote(name)}: data_offsets {quote(offsets)} is not [begin, end]")
    begin, end = offsets
    if end < begin:
        raise _reject(file, f"tensor {quote(name)}: data_offsets [{begin}, {end}] are reversed")
    if end > data_len:
        raise _reject(
            file,
            f"tensor {quote(name)}: data_offsets [{begin}, {end}] run past the data buffer "
            f"({data_len} bytes)",
        )
    expected = math.prod(shape) * allowed[dtype]
    if end - begin != expected:
        raise _reject(
            file,
            f"tensor {quote(name)}: {end - begin} bytes of data but shape {shape} of {dtype} "
            f"needs {expected}",
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def check_safetensors(data: bytes | memoryview, file: str = "adapter_model.safetensors") -> list[TensorEntry]:
    """The tensors of a safetensors file if its bytes are well formed; AdapterRejected naming the problem."""
    size = len(data)
    if size < 8:
        raise _reject(file, f"truncated: {size} bytes, shorter than the 8-byte header length")
    header_len = int.from_bytes(bytes(data[:8]), "little")
    if header_len > MAX_HEADER_BYTES:
        raise _reject(file, f"header of {header_len} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    if 8 + header_len > size:
        raise _reject(file, f"header of {header_len} bytes runs past the end of the file ({size} bytes)")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]).decode("utf-8"), object_pairs_hook=_unique_object)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise _reject(file, f"header is not JSON ({type(exc).__name__})") from exc
    except ValueError as exc:  # json.JSONDecodeError or a duplicate name
        raise _reject(file, f"header is not valid: {exc}") from exc
    if not isinstance(header, dict):
        raise _reject(file, "header is not a JSON object")
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _reject(file, f"{METADATA_KEY} must map strings to strings")
    data_len = size - 8 - header_len
    entries = [_entry(file, name, raw, data_len) for name, raw in header.items()]
    position = 0
    previous = "the start of the data"
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin < position:
            raise _reject(file, f"tensor {quote(entry.name)} overlaps {previous}")
        if entry.begin > position:
            raise _reject(file, f"gap of {entry.begin - position} bytes before tensor {quote(entry.name)}")
        position, previous = entry.end, repr(entry.name)
    if position != data_len:
        raise _reject(file, f"{data_len - position} bytes after the last tensor belong to none")
    return entries
