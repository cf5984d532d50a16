"""The files a PEFT adapter directory may hold: their names, and the config's size and JSON shape.

Plain Python. The safetensors header is checked on raw bytes by safetensors_header.py; what the tensors
mean (kinds, ranks, the base model) by normalizing the folder (adapters package).
"""

from __future__ import annotations

import json
from typing import Any

from peftserve.errors import AdapterRejected, quote

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
ALLOWED_NAMES = (CONFIG_NAME, WEIGHTS_NAME, README_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 64 << 10
MAX_README_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
FORBIDDEN_NAME_CHARS = ("/", "\\", "\0", ":")


def json_depth(text: str) -> int:
    """Deepest nesting of objects/arrays in JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_config(data: bytes) -> dict[str, Any]:
    """adapter_config.json as a dict: at most 64 KiB, UTF-8, nested at most 32 levels, a JSON object."""
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterRejected(f"{CONFIG_NAME}: {len(data)} bytes exceeds the limit of {MAX_CONFIG_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterRejected(f"{CONFIG_NAME}: not UTF-8 text") from exc
    if json_depth(text) > MAX_JSON_DEPTH:
        raise AdapterRejected(f"{CONFIG_NAME}: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise AdapterRejected(f"{CONFIG_NAME}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterRejected(f"{CONFIG_NAME}: expected a JSON object")
    return config


def check_file_name(name: object) -> str:
    """A plain file name: no separators, no '..', not absolute, no NUL, not a pickle."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise AdapterRejected(f"file name {quote(name)} is not valid")
    if any(ch in name for ch in FORBIDDEN_NAME_CHARS) or name.startswith("."):
        raise AdapterRejected(
            f"file name {quote(name)}: path separators, '..', absolute paths and hidden files are not allowed"
        )
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise AdapterRejected(
            f"file {quote(name)}: pickle files are never accepted ({' '.join(PICKLE_SUFFIXES)}); "
            f"save the adapter with safetensors ({WEIGHTS_NAME})"
        )
    if name not in ALLOWED_NAMES:
        raise AdapterRejected(f"unexpected file {quote(name)} (an upload holds {', '.join(ALLOWED_NAMES)})")
    return name
