"""Reading the kept packed weights in while a server imports: which file, all of it, and never torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftserve.config import EngineConfig
from peftserve.runner import read_in
from peftserve.runner.read_in import INDEX, WEIGHTS, kept_file, read_kept_in


def _entry(root: Path, key: str, model: Path, dtype: str, changed: int, size: int = 4096) -> Path:
    entry = root / key
    entry.mkdir(parents=True)
    (entry / INDEX).write_text(json.dumps({"format": 1, "model": str(model), "dtype": f"torch.{dtype}"}))
    weights = entry / WEIGHTS
    weights.write_bytes(os.urandom(size))
    os.utime(weights, ns=(changed, changed))
    return weights


def test_the_kept_file_is_the_newest_of_the_model_in_the_dtype(tmp_path: Path) -> None:
    root, model, other = tmp_path / "packed", tmp_path / "model", tmp_path / "other"
    model.mkdir()
    other.mkdir()
    bf16 = _entry(root, "a", model, "bfloat16", changed=10**18)
    fp32 = _entry(root, "b", model, "float32", changed=2 * 10**18)
    _entry(root, "c", other, "bfloat16", changed=3 * 10**18)
    (root / "d").mkdir()
    (root / "d" / INDEX).write_text("{not json")  # damaged, or half written: passed over
    (root / "e").mkdir()
    (root / "e" / INDEX).write_text(json.dumps({"model": str(model), "dtype": "torch.bfloat16"}))  # no bytes
    assert kept_file(root, model, "bfloat16") == bf16
    assert kept_file(root, model, "float32") == fp32
    assert kept_file(root, model, "auto") == fp32  # the newest
    assert kept_file(root, model, "float16") is None
    assert kept_file(root, tmp_path, "auto") is None
    assert kept_file(tmp_path / "none", model, "auto") is None


def _page_cached(path: Path, offset: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_read_in_reads_the_whole_file_into_the_page_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(read_in, "CHUNK", 2**20)
    path = tmp_path / WEIGHTS
    size = 9 * 2**20 + 4096  # chunks for every reader, and a part of one
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _page_cached(path, size - 4096):
        pytest.skip("this file system keeps the file's pages (tmpfs?)")
    assert read_in.read_in(path).result(timeout=60).startswith("0.01 GB of packed weights read in")
    assert all(_page_cached(path, offset) for offset in range(0, size, 64 * 1024))


def test_a_start_that_would_map_kept_weights_reads_them_in_and_no_other(tmp_path: Path) -> None:
    root, model = tmp_path / "packed", tmp_path / "model"
    model.mkdir()
    _entry(root, "a", model, "bfloat16", changed=10**18, size=3 * 4096)
    config = EngineConfig(model=str(model), dtype="auto", packed_cache=str(root))
    assert read_kept_in(config).result(timeout=60).startswith("0.00 GB of packed weights read in")
    assert read_kept_in(EngineConfig(model=str(model), packed_cache="off")) is None
    assert read_kept_in(EngineConfig(model=str(model), packed_cache=str(root), cpu_linear="torch")) is None
    assert read_kept_in(EngineConfig(model=str(model), packed_cache=str(root), device="cuda")) is None
    assert read_kept_in(EngineConfig(model=str(model), packed_cache=str(root), dtype="float32")) is None
    assert read_kept_in(EngineConfig(model=str(tmp_path / "none"), packed_cache=str(root))) is None
    assert read_kept_in(EngineConfig(model="default", packed_cache=str(root))) is None


def test_reading_in_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys; import peftserve.runner.read_in; "
        "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    environment = {**os.environ, "PYTHONPATH": "server:client"}
    subprocess.run([sys.executable, "-c", code], check=True, env=environment)
