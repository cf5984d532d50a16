"""Inductor's verdict on this CPU's vector instruction sets, kept from one process to the next.

Before inductor first builds C++ for the CPU in a process (attention's compile, the adapters' rows
kernel), it checks each vector instruction set the CPU reports (AVX2, AVX-512, AVX-512 VNNI, AMX) by
building a small library with the compiler and loading it in a subprocess: 0.8 s of every start on the
2-core dev box (1.0 s with the check, 0.2 s without). The verdict depends only on those sets, the
compiler and torch, so it is kept in inductor's cache directory under a key of them. Where every set
passed under the same key, inductor is told to trust them (its own `cpp.vec_isa_ok`, which is
TORCHINDUCTOR_VEC_ISA_OK) and skips the check; a set that failed, or another compiler, torch or CPU,
means the check runs as before. A user's own setting of `cpp.vec_isa_ok` is left alone.

Inductor's settings are context variables, so the trust holds in the thread that sets it: the runner's
warm-up thread, which compiles attention and then builds the adapters' kernel. The list of good sets is
then cached for the whole process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

VERDICTS = "peftserve-vector-units.json"
"""The file in inductor's cache directory: {key: whether every set the CPU reports passed the check}."""
_lock = threading.Lock()
_settled = False


def trust_known_vector_units() -> None:
    """Skip inductor's check of the CPU's vector sets where an earlier process found them all good;
    otherwise run it now and remember the verdict. Once per process, in the thread that compiles next
    (the trust is that thread's setting); other threads wait for the first call."""
    global _settled
    with _lock:
        if _settled:
            return
        _settled = True
        try:
            _settle()
        except Exception:  # noqa: BLE001 - only a start-up shortcut: inductor checks as it always does
            log.debug("no verdict on the CPU's vector units kept", exc_info=True)


def _settle() -> None:
    from torch._inductor import config

    if config.cpp.vec_isa_ok is not None:
        return
    candidates = _candidates()
    key = _key([str(isa) for isa in candidates]) if candidates else None
    if key is None:
        return
    path = _verdicts_path()
    verdicts = _read(path)
    if verdicts.get(key) is True:
        config.cpp.vec_isa_ok = True
        log.debug("trusting the CPU's vector sets %s (checked by an earlier process)", candidates)
        return
    passed = all(bool(isa) for isa in candidates)  # inductor's own check, once per set and process
    _write(path, {**verdicts, key: passed})


def _candidates() -> list:
    """The vector sets inductor would check here: those its table lists whose flags the CPU reports."""
    from torch._inductor import cpu_vec_isa

    if platform.machine() not in ("x86_64", "AMD64"):
        return []  # elsewhere inductor's list does not come from a build check alone
    reported = cpu_vec_isa.x86_isa_checker()
    return [
        isa
        for isa in cpu_vec_isa.supported_vec_isa_list
        if all(flag in reported for flag in str(isa).split())
    ]


def _key(sets: list[str]) -> str | None:
    """The sets, torch's version and the compiler (its resolved path, size and time of change)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    compiler = shutil.which(get_cpp_compiler())
    if compiler is None:
        return None
    stat = os.stat(os.path.realpath(compiler))
    parts = [torch.__version__, os.path.realpath(compiler), str(stat.st_size), str(stat.st_mtime_ns), *sets]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _verdicts_path() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / VERDICTS


def _read(path: Path) -> dict[str, bool]:
    try:
        verdicts = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return verdicts if isinstance(verdicts, dict) else {}


def _write(path: Path, verdicts: dict[str, bool]) -> None:
    """Written to a temporary file and renamed over the old one: a reader sees one or the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(verdicts, indent=1) + "\n")
    os.replace(temporary, path)
