"""Our C++ kernels (runner/paged_attention.cpp, adapters/forms/low_rank_rows.cpp), built once per machine
and loaded in milliseconds.

Inductor's C++ code cache builds each kernel with its flags for this CPU's vector units, links it to
torch's OpenMP and binds its `kernel` function to Python. But even when the library is already on disk,
asking the code cache for it recomputes its compile command (probing the compiler and the CPU): 1.2-1.3
s of a start on the 2-core dev box (Intel Xeon), in a process that has imported what a server imports,
longer than loading a 1.7 GB model from the page cache. So each library, once built,
is also copied into a directory of our own (`$PEFTSERVE_KERNEL_CACHE`, default
`~/.cache/peftserve/kernels`) under a key of everything it depends on (its source and signature, torch,
Python and the CPU's instruction sets), and later processes load that copy directly (0.3-0.6 ms).

A copy appears whole or not at all (written beside, then renamed), and replaces the kernel's copies
under other keys; one cut short or that does not load is removed and built again; a directory we cannot
write to only costs the next start its build.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from peftserve.config import default_kernel_cache
from peftserve.model.loader import cpu_flags

log = logging.getLogger(__name__)

_lock = threading.Lock()

SCALARS = {torch.float32: "float", torch.bfloat16: "at::BFloat16", torch.float16: "at::Half"}
"""The model dtypes our kernels are built for, and the C++ element type of each."""
bf16_dot: bool = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
"""Whether the CPU has AVX512-BF16's dot-product instruction, which the kernels use in bfloat16 (each
product of two bf16 values exact in float32, summed in pairs); they widen every value first without it."""
HEADER = Path(__file__).with_name("native.h")
"""What the kernels share (vectors of floats), put before each one's source."""


class Kernel:
    """One of our C++ kernels (`kernel` in `source`, bound with `parameters`, SCALAR standing for the
    element type), built per dtype and kept (load), loaded once per process."""

    def __init__(self, name: str, source: Path, parameters: Sequence[str]) -> None:
        self.name = name
        self.source = source
        self.parameters = tuple(parameters)
        self._loaded: dict[torch.dtype, Callable[..., None]] = {}

    def get(self, dtype: torch.dtype, build: bool = True) -> Callable[..., None] | None:
        """The kernel for `dtype` (one of SCALARS): loaded already, or from this machine's copy, or else
        built (unless not `build`: then None). Raises what a build raises."""
        if dtype not in self._loaded:
            scalar = SCALARS[dtype]
            source = f"#define SCALAR {scalar}\n" + HEADER.read_text() + self.source.read_text()
            parameters = [p.replace("SCALAR", scalar) for p in self.parameters]
            kernel = load(f"{self.name}-{str(dtype).removeprefix('torch.')}", parameters, source, build)
            if kernel is None:
                return None
            self._loaded[dtype] = kernel
        return self._loaded[dtype]


def load(name: str, parameters: Sequence[str], source: str, build: bool = True) -> Callable[..., None] | None:
    """`source`'s function `kernel`, bound with `parameters` (its C types, as inductor's bindings parse
    them): from our copy when there is one, else built by inductor's code cache and copied (unless not
    `build`: then None). Raises what the build raises (a compile error, no compiler)."""
    key = _key(name, parameters, source)
    root = Path(default_kernel_cache())
    path = root / f"{name}-{key}.so"
    with _lock:
        if path.exists():
            try:
                return _import(path, key)
            except (ImportError, OSError) as exc:
                log.warning("the kept C++ kernel %s did not load (%s); building it again", path, exc)
                path.unlink(missing_ok=True)
        if not build:
            return None
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        kernel = CppPythonBindingsCodeCache.load_pybinding(list(parameters), source)
        _keep(Path(kernel.__self__.__file__), path, name)
        return kernel


def _import(path: Path, key: str) -> Callable[..., None]:
    """The library's `kernel`, imported from `path` as inductor's code cache imports its own."""
    module_name = f"peftserve_native_{key}.kernel"  # the last part names the module's init function
    if module_name in sys.modules:
        return sys.modules[module_name].kernel
    _check_whole(path)
    # the bindings read a tensor's data pointer through a function of torch's, whose address they take
    # from the environment when the module is initialized
    os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = str(
        torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr
    )
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module.kernel


def _check_whole(path: Path) -> None:
    """Raise ImportError unless `path` is a 64-bit little-endian ELF file reaching the end of its section
    headers (the last thing the linker writes): a truncated library would not fail to load, it would
    kill the process with SIGBUS when the loader touched its missing pages."""
    with path.open("rb") as f:
        header = f.read(64)
        size = os.fstat(f.fileno()).st_size
    if len(header) < 64 or header[:6] != b"\x7fELF\x02\x01":
        raise ImportError(f"{path} is not a 64-bit little-endian ELF library")
    sections, entry_size, count = (
        struct.unpack_from("<Q", header, 0x28)[0],
        *struct.unpack_from("<HH", header, 0x3A),
    )
    if size < sections + entry_size * count:
        raise ImportError(f"{path} is cut short ({size} bytes of {sections + entry_size * count})")


def _keep(built: Path, path: Path, name: str) -> None:
    """Copy the built library to `path`, whole or not at all, and remove the kernel's copies under other
    keys (built from older sources, or for another torch): a failure is only logged."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, temporary)
        os.replace(temporary, path)
        for old in path.parent.glob(f"{name}-*.so"):
            if old != path:
                old.unlink(missing_ok=True)  # a process that has it loaded keeps its mapping
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        log.info("C++ kernel not kept in %s (%s): the next start builds it again", path.parent, exc)


def _key(name: str, parameters: Sequence[str], source: str) -> str:
    """What a built library depends on: its source and signature, torch, Python and the CPU."""
    facts = {
        "name": name,
        "parameters": list(parameters),
        "source": hashlib.sha256(source.encode()).hexdigest(),
        "torch": [torch.__version__, torch.version.git_version],
        "python": sys.version,
        "cpu": sorted(cpu_flags()),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]
