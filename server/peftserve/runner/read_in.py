"""The packed weights an earlier start kept (runner/packed_cache.py), read into the page cache while a
server is still importing torch and transformers.

Those imports take 3.8 s of a server's launch here, and a start from a cold page cache then reads the
kept file (3.74 GB for the start-up benchmark's model, 2.3-2.8 s). This module imports neither, so
`peftserve serve` starts reading first thing, and the reading happens under the imports. The start
finds the file in the page cache and maps it as usual; where the reading has not finished, the packed
cache's own readers go over what is left.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from peftserve.config import EngineConfig
from peftserve.runner.priority import lowest_priority

log = logging.getLogger(__name__)

WEIGHTS, INDEX = "weights.bin", "index.json"
"""An entry's files: the packed bytes, and what they are (with the model directory and dtype)."""
READERS = 4
"""Threads reading at once (as the packed cache's readers: 4 read the file 2-3x faster than one here)."""
CHUNK = 64 * 2**20
"""Bytes read at a time, into each reader's own buffer."""


def kept_file(root: Path, model_dir: Path, dtype: str) -> Path | None:
    """The packed weights file kept under `root` for the model in `model_dir` in `dtype` ('auto': in
    any), the newest where there are several (one per dtype, torch or CPU); None where none is kept."""
    model, found = str(model_dir.resolve()), []
    for index in root.glob(f"*/{INDEX}"):
        try:
            facts = json.loads(index.read_text())
            weights = index.with_name(WEIGHTS)
            changed = weights.stat().st_mtime_ns
        except (OSError, ValueError):  # one being written or removed, or damaged: the start will say
            continue
        if facts.get("model") == model and dtype in ("auto", str(facts.get("dtype")).removeprefix("torch.")):
            found.append((changed, weights))
    return max(found)[1] if found else None


def read_in(path: Path) -> Future[str]:
    """Read the file at `path` into the page cache in the background: READERS threads at the lowest CPU
    priority, each reading every READERS-th CHUNK with plain reads, which let the importing thread run
    meanwhile. The result says how long it took."""
    reading: Future[str] = Future()
    reading.set_running_or_notify_cancel()
    size = path.stat().st_size

    def read(first: int) -> None:
        lowest_priority()
        scratch = memoryview(bytearray(CHUNK))
        with path.open("rb", buffering=0) as f:
            for at in range(first * CHUNK, size, READERS * CHUNK):
                f.seek(at)
                f.readinto(scratch)

    def run() -> None:
        began = time.perf_counter()
        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(READERS)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        seconds = time.perf_counter() - began
        reading.set_result(f"{size / 1e9:.2f} GB of packed weights read in ({seconds:.1f} s)")

    threading.Thread(target=run, name="peftserve-read-in", daemon=True).start()
    return reading


def read_kept_in(config: EngineConfig) -> Future[str] | None:
    """Start reading in the packed weights kept for the model `config` serves, where its start would map
    them (a model directory, packed CPU Linear layers, a packed cache); None where there are none."""
    if config.packed_cache == "off" or config.cpu_linear != "onednn" or config.device not in ("cpu", "auto"):
        return None
    model_dir = Path(config.model).expanduser()
    if config.model == "default" or not model_dir.is_dir():
        return None
    path = kept_file(Path(config.packed_cache), model_dir, config.dtype)
    if path is None:
        return None
    log.info("reading the packed weights kept in %s in while the server starts", path.parent)
    reading = read_in(path)
    reading.add_done_callback(lambda done: log.info("%s, while the server started", done.result()))
    return reading
