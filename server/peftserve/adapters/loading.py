"""Normalize a PEFT adapter directory with the loader of its kind (kinds.py: one folder per kind)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from peftserve.errors import AdapterRejected

from .kinds import PEFT_TYPES, kind_for
from .normalized import NormalizedAdapter
from .peft_format import check_magnitude, read_adapter_dir, reject_if_set


def load_adapter(
    path: str | Path, expected_sha256: Mapping[str, str] | None = None, follow_symlinks: bool = True
) -> NormalizedAdapter:
    """Read and normalize one PEFT directory; AdapterRejected names the field or tensor at fault.

    expected_sha256 and follow_symlinks: see read_adapter_dir (the store passes a manifest's hashes).
    """
    config, tensors = read_adapter_dir(path, expected_sha256, follow_symlinks)
    peft_type = config.get("peft_type")
    kind = kind_for(config)
    if kind is None:
        raise AdapterRejected(f"peft_type={peft_type!r} is not served (served: {', '.join(PEFT_TYPES)})")
    reject_if_set(config, "modules_to_save", "full copies of base modules cannot be batched per request")
    for key, value in tensors.items():
        check_magnitude(key, value)
    try:
        adapter = kind.load(config, tensors)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        # A malformed field the loader did not foresee is still the adapter's fault, not the server's.
        raise AdapterRejected(f"malformed {peft_type} adapter ({type(exc).__name__}: {exc})") from exc
    for name, value in adapter.served_tensors():
        check_magnitude(name, value)
    return adapter
