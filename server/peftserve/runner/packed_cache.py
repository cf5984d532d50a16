"""Packed weights kept across starts: the first start writes the model's packed Linear weights to disk,
and later starts map them back instead of packing again.

Packing reorders every weight into oneDNN's blocked layout: seconds of work on a multi-GB model (3.87 GB
in bfloat16: 2-5 s here), every start. The packed bytes depend only on the weights, their dtype, torch's
oneDNN and the CPU's instruction sets. So once a start has packed them all, its warm-up writes them to
one file under the cache directory, keyed by all four. The next start maps that file and wraps each
layer's bytes where they lie as its packed tensor: no copy, no reorder. They are clean file pages: under
memory pressure the kernel may drop them and read them again later, where a packed copy made in memory
could only be swapped out.

Such a start does not read those layers' plain weights from the checkpoint at all (prefetch, then
read_base_model's `unread`): the model is read without them while the kept file is read into memory
in the background, so it reads from the disk what loading the checkpoint would, no more, and runs at
full speed once that is read.

An entry is `<root>/<key>/`, with `weights.bin` (each layer's bytes at a page-aligned offset) and
`index.json` (per layer: offset, size, shape, dtype, and oneDNN's description of the layout). It appears
whole or not at all: it is written under a temporary name and renamed once synced, so a crash leaves at
most a temporary, which the next writer removes. A start checks the entry against the model (the same
layers, shapes and dtype), then unpacks its first layer and compares it bit for bit with the plain
weight, the one the start read. An entry that fails is removed, and the model is read whole and packed
as without it. Bytes damaged on disk in other layers are not detected then: hashing the file would
cost what the entry saves.

A model whose weights were all read already (LLMEngine.from_model, say) takes the entry only where at
least half of its file is in the page cache (RESIDENT_MIN): reading it from the disk would come on top.
Otherwise it packs as if there were no entry, then moves its layers onto the file in the background
(adopt), comparing each layer's bytes with the ones it packed. That frees the copies, leaves the file
cached for the next start, and removes an entry whose bytes differ anywhere.

The wrapping goes through the C functions torch's ahead-of-time compiled models load their packed
constants with (`aoti_torch_create_tensor_from_blob_v2` in libtorch_cpu); private to torch, hence a
probe at first use (usable) and torch's upper bound in pyproject.toml. Linux only (the library's name,
/proc/cpuinfo); elsewhere nothing is kept.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future
from functools import cache
from pathlib import Path

import torch
from torch import nn

from peftserve.model.loader import cpu_flags
from peftserve.runner.linear import (
    PAGE,
    PackedLinear,
    cached_share,
    file_mappings,
    libc,
    onednn_usable,
    pack,
    packed_linear,
    packing_targets,
    replace_linear,
    unpack,
)
from peftserve.runner.priority import lowest_priority

log = logging.getLogger(__name__)

FORMAT = 1
"""The entry layout's version: part of the key, so that a new layout never reads an old entry."""
WEIGHTS, INDEX = "weights.bin", "index.json"
SYNC_BYTES = 256 * 2**20
"""Written bytes synced at a time, so that writing a model's weights does not fill memory with their
dirty pages (once synced, they are clean page cache, which the kernel reclaims when it needs to)."""
MADV_POPULATE_READ = 22
"""Linux's madvise advice that faults a range in for reading (from 5.14 on)."""
RESIDENT_MIN = 0.5
"""The least share of the kept file in the page cache for a model read whole to map it rather than
pack (a start that read the model without its Linear weights maps it wherever it lies). From a cold
page cache, reading the 3.74 GB file on top of the checkpoint put the first request 1.5-2.5 s after
packing's, with full speed no sooner (benchmarks/README.md, "Packed weights kept across starts"). A
start that passes the file by moves its layers onto it once they are packed (adopt), and a server's
steps read it, so the next start finds it cached."""
READ_CHUNK = 64 * 2**20
"""Bytes of a kept file read in at a time (prefetch): the unit in which a close stops it."""
READERS = 4
"""Threads reading a kept file in (prefetch): the 3.74 GB file of the start-up benchmark was read in
1.9-2.9 s by 4, 2.1-2.7 s by 2 and 5.4-6.9 s by one, alone, from a cold page cache, over two days on the
2-vCPU Intel Xeon (6 or 8 readers: 2.3 s, no better)."""
FREE_MARGIN = 2**30
"""Disk space left free after an entry; with less, nothing is written."""
DTYPE_SHIMS = {torch.float32: "aoti_torch_dtype_float32", torch.bfloat16: "aoti_torch_dtype_bfloat16"}


class PackedCache:
    """The entry of one model directory in one dtype under `root`, on this CPU and torch."""

    def __init__(self, root: str | Path, model_dir: Path, dtype: torch.dtype) -> None:
        self.root = Path(root)
        self.model_dir = model_dir.resolve()
        self.dtype = dtype
        self.key = _key(self.model_dir, dtype)
        self.entry = self.root / self.key
        self.reading: Future[str] | None = None
        """The entry's file being read into memory (prefetch); None where nothing reads it."""
        self._mapped: tuple[dict[str, dict], torch.UntypedStorage] | None = None  # prefetch's _open
        self._closed = threading.Event()

    def prefetch(self) -> frozenset[str]:
        """Before the model is read: the weights it need not read from its checkpoint, as this entry
        holds them packed (read_base_model's `unread`), while the entry's file is read into memory in
        the background where it is not all there (self.reading). That is every layer's weight but one,
        the first in the file, which restore compares bit for bit with its packed bytes. Empty where
        there is no entry to take (none, one this torch cannot map back, or one whose index or size is
        wrong: removed)."""
        if not usable(self.dtype) or not (self.entry / INDEX).exists():
            return frozenset()
        try:
            self._mapped = layers, storage = self._open()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("packed weights kept in %s not used (%s); packing again", self.entry, exc)
            self.discard()
            return frozenset()
        if cached_share(storage) < 1:  # where it is all in the page cache, steps map it in at once
            self.reading = _read_in(storage, self._closed)
        first = min(layers, key=lambda name: layers[name]["offset"])
        return frozenset(f"{name}.weight" for name in layers if name != first)

    def close(self) -> None:
        """Stop reading the entry's file in (what is mapped stays valid: it is read on use)."""
        self._closed.set()

    def restore(self, model: nn.Module, unread: frozenset[str] = frozenset()) -> int:
        """Put the kept packed weights in place of the model's Linear layers (pack_linears' targets);
        how many were replaced: all of them, or 0 where there is no usable entry (a missing one quietly,
        one that does not fit the model or is damaged with a warning, and then it is removed), or where
        the entry is mostly out of the page cache (RESIDENT_MIN: kept, for keep to move onto).

        unread: the weights the model was read without (prefetch's answer, read_base_model's): the
        entry is then taken wherever its file lies, since it is read in place of the checkpoint's
        bytes, not beside them. Where it fails, those weights are garbage: read the model again."""
        targets = packing_targets(model)
        if not targets or not (self.entry / INDEX).exists() or not usable(self.dtype):
            return 0
        began = time.perf_counter()
        try:
            storage, packed = self._read(model, targets, unread)
        except _NotCached as cold:
            log.info(
                "packed weights kept in %s not used: %.0f%% of them is in the page cache, so this start"
                " packs rather than reading the rest from the disk",
                self.entry, 100 * cold.share,
            )  # fmt: skip
            return 0
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            log.warning("packed weights kept in %s not used (%s); packing again", self.entry, exc)
            self.discard()
            return 0
        mappings = file_mappings()
        for path in targets:
            replace_linear(
                model, path, functools.partial(PackedLinear, packed=packed[path], holder=storage), mappings
            )
        log.info(
            "%d Linear layers run on packed weights kept in %s (%.2f s)",
            len(targets), self.entry, time.perf_counter() - began,
        )  # fmt: skip
        return len(targets)

    def _read(
        self, model: nn.Module, targets: list[str], unread: frozenset[str]
    ) -> tuple[torch.UntypedStorage, dict[str, torch.Tensor]]:
        """The entry's file mapped (_open, or prefetch's), and each target's packed weight wrapped in it;
        ValueError (and the rest of restore's list) where the entry does not fit the model, _NotCached
        where too little of the file is in the page cache (measured before anything here reads it) and
        the model's own weights were all read."""
        layers, storage = self._mapped or self._open()
        _check_layers(layers, targets)
        if not unread and (share := cached_share(storage)) < RESIDENT_MIN:
            raise _NotCached(share)
        packed = {}
        for path in targets:
            weight, layer = model.get_submodule(path).weight, layers[_name(path)]
            if layer["shape"] != list(weight.shape) or layer["dtype"] != str(weight.dtype):
                raise ValueError(f"{_name(path)} is {layer['dtype']} {layer['shape']} there, not the model's")
            address, layout = _place(path, layer, storage, layer["bytes"])
            packed[path] = wrap(address, weight.shape, weight.dtype, layout)
            if torch.ops.mkldnn._nbytes(packed[path]) != layer["bytes"]:
                raise ValueError(f"{_name(path)}'s layout does not span its bytes")
        read = [path for path in targets if f"{_name(path)}.weight" not in unread]
        if not read:
            raise ValueError("the model was read without any of its layers, so none can be compared")
        if not torch.equal(unpack(packed[read[0]]), model.get_submodule(read[0]).weight):
            raise ValueError(f"{read[0]} unpacked differs from the model's weight")
        return storage, packed

    def _open(self) -> tuple[dict[str, dict], torch.UntypedStorage]:
        """The entry's layers by name and its file mapped (nothing read yet); ValueError where its format
        or its size are not what they should be."""
        index = json.loads((self.entry / INDEX).read_text())
        layers = index["layers"]
        if index["format"] != FORMAT:
            raise ValueError(f"its format is {index['format']}, not {FORMAT}")
        size = (self.entry / WEIGHTS).stat().st_size
        if size != index["bytes"]:
            raise ValueError(f"{WEIGHTS} has {size} bytes, its index says {index['bytes']}")
        return layers, torch.UntypedStorage.from_file(str(self.entry / WEIGHTS), shared=False, nbytes=size)

    def keep(self, model: nn.Module, stop: threading.Event | None = None) -> str:
        """Write the model's packed weights as this entry, once every target is packed (best effort: what
        stops it, a full disk or a read-only directory, is said in the result, also as a warning, and
        leaves nothing); where the entry exists already, move the layers onto it (adopt)."""
        if not usable(self.dtype):
            return "packed weights not kept: torch cannot map them back here"
        layers = [(path, m) for path, m in model.named_modules() if isinstance(m, PackedLinear)]
        if not layers or packing_targets(model):
            return "packed weights not kept: some layers are not packed"
        if self.entry.exists():
            return self.adopt(layers, stop)
        sizes = [torch.ops.mkldnn._nbytes(m.packed) for _, m in layers]
        need = sum(-(-n // PAGE) * PAGE for n in sizes)
        began = time.perf_counter()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.root).free
            if free < need + FREE_MARGIN:
                return _warn(
                    f"packed weights not kept: {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free in {self.root}"
                )
            self._sweep()
            temporary = self.root / f".{self.key}.{os.getpid()}.tmp"
            try:
                self._write(temporary, layers, sizes, stop)
                os.rename(temporary, self.entry)  # fails if another process kept it first
            finally:
                shutil.rmtree(temporary, ignore_errors=True)
            _sync_directory(self.root)
        except _Stopped:
            return "packed weights not kept: the engine closed"
        except OSError as exc:
            if self.entry.exists():  # another process kept them first
                return self.adopt(layers, stop)
            return _warn(f"packed weights not kept in {self.root}: {exc}")
        self._drop_superseded()
        seconds = time.perf_counter() - began
        return f"packed weights kept in {self.entry} ({need / 1e9:.2f} GB, {seconds:.1f} s)"

    def adopt(self, layers: list[tuple[str, PackedLinear]], stop: threading.Event | None = None) -> str:
        """Move layers packed in memory onto this entry's file, which a start passed by when it was not in
        the page cache (restore): one layer at a time, read its bytes in, compare them with the ones
        packed here, and swap its packed tensor for the mapped one. The copies made in memory are freed,
        engines on the machine share the file's pages, and the next start finds them cached. A layer
        whose bytes differ means a damaged entry: it is removed, and the layers not yet moved keep their
        copies (those moved were identical)."""
        began, moved = time.perf_counter(), 0
        try:
            entries, storage = self._mapped or self._open()
            _check_layers(entries, [path for path, _ in layers])
            for path, module in layers:
                if stop is not None and stop.is_set():
                    break
                if module._holder is not None:
                    continue
                size = torch.ops.mkldnn._nbytes(module.packed)
                address, layout = _place(path, entries[_name(path)], storage, size)
                length, here = (
                    ctypes.c_size_t(size),
                    ctypes.c_void_p(torch.ops.mkldnn.data_ptr(module.packed)),
                )
                libc().madvise(ctypes.c_void_p(address), length, MADV_POPULATE_READ)  # read in, in one go
                same_layout = layout == _layout(module.packed)
                if not same_layout or libc().memcmp(ctypes.c_void_p(address), here, length):
                    raise ValueError(f"{_name(path)}'s bytes differ from those packed here")
                module.packed = wrap(address, module.packed.shape, module.packed.dtype, layout)
                module._holder = storage
                moved += 1
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            self.discard()
            return _warn(
                f"packed weights kept in {self.entry} removed ({exc}; {moved} layers had moved onto it)"
            )
        seconds = time.perf_counter() - began
        return f"packed weights already kept in {self.entry}: {moved} layers moved onto it ({seconds:.1f} s)"

    def _write(
        self,
        directory: Path,
        layers: list[tuple[str, PackedLinear]],
        sizes: list[int],
        stop: threading.Event | None,
    ) -> None:
        """weights.bin then index.json into `directory`, both synced."""
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        index: dict[str, object] = {"format": FORMAT, "model": str(self.model_dir), "dtype": str(self.dtype)}
        entries: dict[str, dict[str, object]] = {}
        with open(directory / WEIGHTS, "wb") as f:
            synced = 0
            for (path, module), size in zip(layers, sizes, strict=True):
                if stop is not None and stop.is_set():
                    raise _Stopped
                offset = -(-f.tell() // PAGE) * PAGE
                f.seek(offset)
                f.write((ctypes.c_uint8 * size).from_address(torch.ops.mkldnn.data_ptr(module.packed)))
                layout = _layout(module.packed)
                entries[_name(path)] = {
                    "offset": offset,
                    "bytes": size,
                    "shape": [module.out_features, module.in_features],
                    "dtype": str(self.dtype),
                    "layout": base64.b64encode(layout).decode(),
                }
                if f.tell() - synced >= SYNC_BYTES:
                    synced = _sync(f)
            index["bytes"] = _sync(f)
        index["layers"] = entries
        with open(directory / INDEX, "w") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def discard(self) -> None:
        """Remove this entry (a process that has it mapped reads on: the file lives until unmapped), and
        stop reading it in: an entry kept later under the same key is mapped anew."""
        self.close()
        self._mapped = None
        shutil.rmtree(self.entry, ignore_errors=True)

    def _sweep(self) -> None:
        """Remove the temporaries of writers that are gone (crashed or killed mid-write)."""
        for temporary in self.root.glob(".*.tmp"):
            pid = temporary.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(temporary, ignore_errors=True)

    def _drop_superseded(self) -> None:
        """Remove the entries of this model directory in this dtype under other keys (its files changed,
        or torch or the CPU did): they would never be read again."""
        for entry in self.root.iterdir():
            if entry.name == self.key or entry.name.startswith("."):
                continue
            try:
                index = json.loads((entry / INDEX).read_text())
            except (OSError, ValueError):
                continue
            if index.get("model") == str(self.model_dir) and index.get("dtype") == str(self.dtype):
                shutil.rmtree(entry, ignore_errors=True)


def _warn(message: str) -> str:
    """The message, logged as a warning (the engine serves on: it packs at every start)."""
    log.warning("%s; the next start packs again", message)
    return message


def _name(path: str) -> str:
    """A layer's name in an entry: its module path without the adapter layers wrapped around it, so that
    an entry fits the model with or without them (`peftserve model pack` loads it without)."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def _check_layers(layers: dict[str, dict], paths: list[str]) -> None:
    """ValueError unless an entry's layers are the ones at `paths` (module paths) in the model."""
    if sorted(layers) != sorted(map(_name, paths)):
        raise ValueError("its layers are not the model's")


def _read_in(storage: torch.UntypedStorage, stop: threading.Event) -> Future[str]:
    """Read a mapped file into memory in the background, READ_CHUNK at a time, in READERS threads at the
    lowest CPU priority, by reading one byte of each page; its result says how long it took, or that
    `stop` ended it early.

    Reading a page through the mapping reads it from the disk (with the kernel's read-ahead), maps it
    into the process (so steps take no page faults on it) and touches it. The touch costs nothing on
    a machine of its own, but in a virtual machine whose host takes back the memory its guest frees, a
    page's first touch is when the host gives it again: a first pass over a 3.74 GB file just read in
    took 7.3 s here, the next 0.24 s (Firecracker); the first step would pay that. Several readers
    overlap their waits on the disk and on the host.
    """
    reading: Future[str] = Future()
    reading.set_running_or_notify_cancel()
    pages = torch.empty(0, dtype=torch.uint8).set_(storage)  # [bytes], over the mapping
    size = pages.numel()

    def read(first: int) -> None:
        """Chunks first, first + READERS, first + 2 READERS, ..."""
        lowest_priority()
        for start in range(first * READ_CHUNK, size, READERS * READ_CHUNK):
            if stop.is_set():
                return
            pages[start : start + READ_CHUNK : PAGE].sum()

    def run() -> None:
        began = time.perf_counter()
        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(READERS)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        if stop.is_set():
            reading.set_result("reading the packed weights in stopped")
        else:
            seconds = time.perf_counter() - began
            reading.set_result(f"{size / 1e9:.2f} GB of packed weights read in ({seconds:.1f} s)")

    threading.Thread(target=run, name="peftserve-read-packed", daemon=True).start()
    return reading


def _layout(packed: torch.Tensor) -> bytes:
    """oneDNN's description of a packed weight's layout, as wrap takes it."""
    return torch.ops.mkldnn._get_mkldnn_serialized_md(packed).numpy().tobytes()


def _place(path: str, layer: dict, storage: torch.UntypedStorage, size: int) -> tuple[int, bytes]:
    """Where a layer's `size` bytes lie in the mapped file, and its oneDNN layout; ValueError where its
    index entry does not say that many bytes, page-aligned and inside the file."""
    offset = layer["offset"]
    if layer["bytes"] != size or offset % PAGE or offset + size > storage.nbytes():
        raise ValueError(f"{_name(path)}'s bytes are not in {WEIGHTS} as packed here")
    return storage.data_ptr() + offset, base64.b64decode(layer["layout"])


class _NotCached(Exception):
    """Less than RESIDENT_MIN of an entry's file is in the page cache."""

    def __init__(self, share: float) -> None:
        super().__init__(share)
        self.share = share


class _Stopped(Exception):
    """The engine closed while an entry was being written."""


def _key(model_dir: Path, dtype: torch.dtype) -> str:
    """What the packed bytes depend on: the weights (each file's name, size and time of change), the
    dtype, torch (with its oneDNN) and the CPU's instruction sets."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    facts = {
        "format": FORMAT,
        "model": str(model_dir),
        "files": [[p.name, st.st_size, st.st_mtime_ns] for p in files for st in [p.stat()]],
        "dtype": str(dtype),
        "torch": [torch.__version__, torch.version.git_version],
        "cpu": sorted(cpu_flags()),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def wrap(address: int, shape: torch.Size, dtype: torch.dtype, layout: bytes) -> torch.Tensor:
    """The packed weight whose bytes are at `address`, in oneDNN's `layout` (as packing described it),
    without a copy: whatever holds those bytes must outlive the tensor."""
    shim = _shim()
    sizes = (ctypes.c_int64 * 2)(*shape)
    strides = (ctypes.c_int64 * 2)(shape[1], 1)
    handle = ctypes.c_void_p()
    failed = shim.aoti_torch_create_tensor_from_blob_v2(
        ctypes.c_void_p(address), 2, sizes, strides, 0, _code(DTYPE_SHIMS[dtype]),
        _code("aoti_torch_device_type_cpu"), 0, ctypes.byref(handle), _code("aoti_torch_layout__mkldnn"),
        layout, len(layout),
    )  # fmt: skip
    if failed or not handle.value:
        raise RuntimeError("torch could not wrap the packed bytes")
    capsule = ctypes.pythonapi.PyCapsule_New
    capsule.restype, capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(capsule(handle.value, None, None))


@cache
def _shim() -> ctypes.CDLL:
    shim = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    shim.aoti_torch_create_tensor_from_blob_v2.restype = ctypes.c_int32
    shim.aoti_torch_create_tensor_from_blob_v2.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32,
        ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32, ctypes.c_char_p,
        ctypes.c_int64,
    ]  # fmt: skip
    return shim


@cache
def _code(name: str) -> int:
    """One of the shim's constants (a dtype, device type or layout code)."""
    function = getattr(_shim(), name)
    function.restype = ctypes.c_int32
    return function()


@cache
def usable(dtype: torch.dtype) -> bool:
    """Whether packed weights can be kept here: packing works for the dtype, and a packed weight's bytes,
    copied elsewhere and wrapped, unpack and multiply as the original (a probe, once per dtype)."""
    if dtype not in DTYPE_SHIMS or not onednn_usable(dtype):
        return False
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=gen).to(dtype)
    x = torch.randn(3, 40, generator=gen).to(dtype)
    try:
        with torch.inference_mode():
            packed = pack(weight)
            size = torch.ops.mkldnn._nbytes(packed)
            copy = torch.empty(size + PAGE, dtype=torch.uint8)
            address = -(-copy.data_ptr() // PAGE) * PAGE
            ctypes.memmove(address, torch.ops.mkldnn.data_ptr(packed), size)
            layout = _layout(packed)
            wrapped = wrap(address, weight.shape, dtype, layout)
            same = torch.equal(unpack(wrapped), weight) and torch.equal(
                packed_linear(x, wrapped), packed_linear(x, packed)
            )
            del wrapped  # before `copy`, which holds its bytes
    except (AttributeError, OSError, RuntimeError) as exc:  # a torch without these functions
        log.warning("packed weights cannot be kept across starts here (%s)", exc)
        return False
    return same


def _sync(f) -> int:
    """Sync what was written to `f`; where it ends."""
    f.flush()
    os.fsync(f.fileno())
    return f.tell()


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
