"""manifest.json: an AdapterManifest as JSON, written last into a version folder before it is committed."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .files import read_chunks
from .ids import ID_PART, VERSION

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
FORMAT = 1
"""Bumped when the manifest's fields change incompatibly."""


@dataclass(frozen=True)
class FileEntry:
    """One stored file of an adapter version."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class AdapterManifest:
    """The stored description of one adapter version (written beside its files as manifest.json)."""

    adapter_id: str
    """Full id: '<tenant>/<name>'."""
    version: str
    """'v1', 'v2', ... increasing per adapter id."""
    kind: str
    """How it is served (adapters/kinds.py): lora, adalora, dora, ia3, loha, lokr, vera, sparse, prefix."""
    peft_type: str
    base_fingerprint: str
    """Identifies the base model architecture the adapter was validated against."""
    ranks: tuple[int, ...]
    target_modules: tuple[str, ...]
    num_virtual_tokens: int
    nbytes: int
    """Bytes of all stored files."""
    files: tuple[FileEntry, ...]
    created_at: float
    """Unix time of the commit."""
    device_bytes: int = 0
    """Bytes one device slot holds for it (prefix tuning: its K/V) in the served dtype."""
    shared_bytes: int = 0
    """Bytes held once for every adapter sharing them (VeRA's frozen projections), in the served dtype."""
    forms: tuple[tuple[str, int], ...] = ()
    """(compute form, modules) it is served as, e.g. (('dense', 3), ('low_rank', 11)) for a LoHa."""
    needs_max_rank: int = 0
    """The smallest --adapter-max-rank that serves it: its largest rank, or entries / (out + in)."""


def file_entry(path: Path, follow_symlinks: bool = False) -> FileEntry:
    """Name, size and sha256 of a regular file, read a chunk at a time."""
    digest, size = hashlib.sha256(), 0
    for chunk in read_chunks(path, follow_symlinks):
        digest.update(chunk)
        size += len(chunk)
    return FileEntry(path.name, size, digest.hexdigest())


def manifest_to_json(manifest: AdapterManifest) -> bytes:
    body = {
        "format": FORMAT,
        "adapter_id": manifest.adapter_id,
        "version": manifest.version,
        "kind": manifest.kind,
        "peft_type": manifest.peft_type,
        "base_fingerprint": manifest.base_fingerprint,
        "ranks": list(manifest.ranks),
        "target_modules": list(manifest.target_modules),
        "num_virtual_tokens": manifest.num_virtual_tokens,
        "nbytes": manifest.nbytes,
        "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in manifest.files],
        "created_at": manifest.created_at,
        "device_bytes": manifest.device_bytes,
        "shared_bytes": manifest.shared_bytes,
        "forms": dict(manifest.forms),
        "needs_max_rank": manifest.needs_max_rank,
    }
    return (json.dumps(body, indent=1) + "\n").encode()


def _field(body: dict, name: str, kind: type) -> object:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"manifest field {name!r} is missing or not {kind.__name__}")
    return value


def _ints(body: dict, name: str) -> tuple[int, ...]:
    values = _field(body, name, list)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"manifest field {name!r} must list non-negative integers")
    return tuple(values)


def manifest_from_json(data: bytes) -> AdapterManifest:
    """Parse and check a manifest; ValueError says what is wrong (the version is then not served)."""
    body = json.loads(data.decode("utf-8"))
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError(f"not a format-{FORMAT} manifest")
    adapter_id = _field(body, "adapter_id", str)
    parts = adapter_id.split("/")
    if len(parts) != 2 or not all(ID_PART.fullmatch(p) for p in parts):
        raise ValueError(f"adapter_id {adapter_id!r} is not a full id")
    version = _field(body, "version", str)
    if not VERSION.fullmatch(version):
        raise ValueError(f"version {version!r} is not vN")
    files = []
    for entry in _field(body, "files", list):
        if not isinstance(entry, dict):
            raise ValueError("manifest files must be objects")
        files.append(
            FileEntry(_field(entry, "name", str), _field(entry, "size", int), _field(entry, "sha256", str))
        )
    targets = _field(body, "target_modules", list)
    if not all(isinstance(t, str) for t in targets):
        raise ValueError("target_modules must be strings")
    forms = body.get("forms", {})
    if not isinstance(forms, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in forms.items()
    ):
        raise ValueError("forms must map form names to module counts")
    sizes = {name: body.get(name, 0) for name in ("device_bytes", "shared_bytes", "needs_max_rank")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values()):
        raise ValueError("device_bytes, shared_bytes and needs_max_rank must be non-negative integers")
    created = body.get("created_at")
    if not isinstance(created, (int, float)) or isinstance(created, bool) or not math.isfinite(created):
        raise ValueError("created_at must be a number")
    return AdapterManifest(
        adapter_id=adapter_id,
        version=version,
        kind=_field(body, "kind", str),
        peft_type=_field(body, "peft_type", str),
        base_fingerprint=_field(body, "base_fingerprint", str),
        ranks=_ints(body, "ranks"),
        target_modules=tuple(targets),
        num_virtual_tokens=_field(body, "num_virtual_tokens", int),
        nbytes=_field(body, "nbytes", int),
        files=tuple(files),
        created_at=float(created),
        forms=tuple(sorted(forms.items())),
        **sizes,
    )
