"""Faster dense layers on CPU: the model's Linear layers run oneDNN on weights packed once at start.

torch sends a float32 `F.linear` on CPU to MKL's sgemm, which is slow on the skinny shapes of serving
(decode steps multiply 1-64 rows by each weight). oneDNN on a weight reordered once into its blocked
layout is 1.1-3.6x faster there from 4 rows up (benchmarks/bench_linear.py on the 2-core dev box, one
thread, bench-1b shapes: gate_proj at 32 rows 55 -> 87 GFLOP/s, lm_head at 32 rows 43 -> 96), within
0.75-1.5x of sgemm at 1-3 rows in float32, and 1.4-2.6x faster than torch's at 1-3 rows in bfloat16.
So every row count runs on the packed weight, and the packed weight is the only copy: the plain one
is freed as soon as its packed copy exists, its pages too when it was mapped from the checkpoint file
(peak memory stays the weights plus a layer). What reads `.weight` (a DoRA adapter binding its norms,
autograd) gets it unpacked, exactly, on each read.

A Linear whose weight another module also holds (an output head tied to the embeddings) is left
alone: packing it would add a second copy of that matrix rather than replace the first.

The ops are the ones inductor's CPU weight prepacking uses (torch.ops.mkldnn._reorder_linear_weight and
_linear_pointwise): private to torch, hence a probe against F.linear at start and the fallback to plain
torch wherever it fails, and torch's upper bound in pyproject.toml.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16)
PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4
"""Linux's madvise advice that drops pages from the process (the same value on every architecture)."""


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] reordered into oneDNN's blocked layout (an opaque tensor for packed_linear)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The plain weight [out, in] of a packed one, bit for bit (a new tensor each call)."""
    return packed.to_dense()


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) on the packed weight: x [..., in] -> [..., out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@cache
def onednn_usable(dtype: torch.dtype) -> bool:
    """Whether packed oneDNN linears exist in this torch and agree with F.linear on a probe (once)."""
    if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=gen).to(dtype)
    bias = torch.randn(24, generator=gen).to(dtype)
    x = torch.randn(2, 5, 40, generator=gen).to(dtype)
    try:
        with torch.inference_mode():
            packed = pack(weight)
            got = packed_linear(x, packed, bias)
            unpacked = unpack(packed)
    except (AttributeError, RuntimeError) as exc:  # AttributeError: a torch without these ops
        log.warning("oneDNN linear unavailable (%s); using torch's", exc)
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return (
        got.shape == (2, 5, 24)
        and torch.allclose(got, F.linear(x, weight, bias), atol=tolerance, rtol=0)
        and torch.equal(unpacked, weight)
    )


class PackedLinear(nn.Linear):
    """An nn.Linear whose weight is held only in oneDNN's packed layout; `.weight` unpacks it."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor | None = None, holder: object = None) -> None:
        """packed: the linear's weight already packed (runner/packed_cache.py), else packed here; holder:
        what must live as long as it (the file mapping its bytes are in)."""
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        if packed is None:
            with torch.inference_mode():
                packed = pack(linear.weight)
        self.packed = packed  # opaque, not in the state dict
        self._holder = holder

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The weight [out, in], unpacked on each read (a copy: costs the layer's bytes and a pass)."""
        return unpack(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.bias is not None and self.bias.requires_grad):
            return F.linear(x, self.weight, self.bias)  # no derivatives for the packed op: pay a copy
        return packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, onednn_packed=True"


def file_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process's private file mappings (where weights loaded by mmap live); Linux."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and fields[4] != "0" and fields[1].endswith("p") and fields[5].startswith("/"):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_file_pages(weight: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Drop from this process the pages of a weight read through a private file mapping.

    A model loaded from safetensors keeps its weights in one mapping of the file, held while any of its
    tensors lives (the embeddings do), so a dropped weight's pages would stay resident. They were never
    written (a frozen weight), so discarding them only means a later read would fetch them from the file
    again; pages the weight shares with its neighbours are kept.
    """
    first = weight.data_ptr()
    last = first + weight.numel() * weight.element_size()
    inside = any(s <= first and last <= e for s, e in mappings)
    if not sys.platform.startswith("linux") or not inside or not weight.is_contiguous():
        return
    start, end = -(-first // PAGE) * PAGE, last // PAGE * PAGE
    if end > start:
        libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def cached_share(storage: torch.UntypedStorage, samples: int = 1024) -> float:
    """The share of a mapped file's pages in the page cache, from `samples` pages spread evenly over it
    (every page where it has fewer), each asked of Linux's mincore, which reads nothing; 1.0 where it
    fails. Asking for every page took 0.03 s of a 0.35 s start on the start-up benchmark's 3.74 GB
    packed file."""
    pages = -(-storage.nbytes() // PAGE)
    if not pages:
        return 1.0
    asked = range(0, pages, -(-pages // samples))
    vector, cached = (ctypes.c_ubyte * 1)(), 0
    for page in asked:
        if libc().mincore(ctypes.c_void_p(storage.data_ptr() + page * PAGE), ctypes.c_size_t(PAGE), vector):
            return 1.0
        cached += vector[0] & 1
    return cached / len(asked)


@cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def packing_targets(model: nn.Module) -> list[str]:
    """Paths of the model's Linear layers that pack_linears replaces: plain nn.Linear on CPU in `DTYPES`,
    each the only holder of its weight."""
    holders: dict[int, int] = {}  # id(weight) -> modules holding it (tied weights count twice)
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    return [
        path
        for path, module in model.named_modules()
        if type(module) is nn.Linear
        and module.weight.device.type == "cpu"
        and holders[id(module.weight)] == 1
        and onednn_usable(module.weight.dtype)
    ]


def replace_linear(
    model: nn.Module, path: str, make: Callable[[nn.Linear], PackedLinear], mappings: list[tuple[int, int]]
) -> None:
    """Put make(layer) in place of the Linear at `path`, then release its plain weight's pages if they
    are in one of `mappings` (file_mappings)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    plain = getattr(parent, name)
    setattr(parent, name, make(plain))
    release_file_pages(plain.weight, mappings)


def pack_linears(model: nn.Module, stop: threading.Event | None = None) -> int:
    """Replace every CPU nn.Linear of the model in `DTYPES` by a PackedLinear (packing_targets); how many
    were replaced.

    One layer at a time, each plain weight dropped (and its pages released, release_file_pages) once its
    packed copy exists, so memory peaks at the weights plus one layer. Weights must not be changed
    afterwards. stop: once set, the layers not yet packed stay plain.
    """
    mappings = file_mappings()
    packed = 0
    for path in packing_targets(model):
        if stop is not None and stop.is_set():
            break
        replace_linear(model, path, PackedLinear, mappings)
        packed += 1
    return packed
