"""The CPU's paged-attention kernel: every packed token attends to its own sequence's entries of the pool,
in one C++ pass per layer (paged_attention.cpp).

Like flex attention in place (runner/flex.py) it reads each token's keys and values where they lie in
the paged pool, through the step's block tables (PagedLayout), and reads each KV head's entries once for
all the query heads that share it. Unlike flex it needs no torch.compile: the library is built once
per dtype by inductor's C++ code cache (2.4-4 s on the 2-core dev box), kept on disk, and later processes
load it in milliseconds, so a restarted server attends at full speed as soon as its weights are loaded.
And it reads only the entries each token sees: no block is masked, so no value row past a sequence's end is
ever read and nothing needs zeroing before a step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from peftserve import native
from peftserve.runner.flex import PagedLayout

log = logging.getLogger(__name__)

SCALARS = {torch.float32: "float", torch.bfloat16: "at::BFloat16", torch.float16: "at::Half"}
"""The model dtypes the kernel is built for, and the C++ element type of each."""
_SOURCE = Path(__file__).with_name("paged_attention.cpp")
_PARAMETERS = (
    *("const SCALAR*", "int64_t", "int64_t"),  # q and its token and head strides
    *("const SCALAR*", "const SCALAR*", "int64_t", "int64_t"),  # keys, values: slot and head strides
    "SCALAR*",  # out
    *("const int64_t*", "const int64_t*", "const int64_t*"),  # token_pos, token_row, first
    *("const int64_t*", "int64_t"),  # tables and their width
    *("int64_t", "int64_t", "int64_t", "int64_t", "int64_t"),  # tokens, heads, KV heads, head size, block
    *("float", "float", "int64_t", "int64_t"),  # scaling, softcap, bf16_dot, threads
)
"""`kernel`'s parameters as inductor's bindings parse its arguments (a tensor as its data pointer)."""


bf16_dot: bool = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
"""Whether bfloat16 scores run on the CPU's bf16 dot-product instruction (AVX512-BF16): each product
exact in float32, summed in pairs; the generic loop widens every value to float32 first."""


_loaded: dict[torch.dtype, Callable[..., None]] = {}
"""The kernel of each dtype loaded in this process."""


def load(dtype: torch.dtype, build: bool = False) -> bool:
    """Whether the kernel for `dtype` is ready: loaded from this machine's built copy (milliseconds), or
    else built (`build`: 2.4-4 s on the 2-core dev box; peftserve/native.py). False for a dtype it is
    not built for; raises what a build raises."""
    if dtype not in SCALARS:
        return False
    if dtype not in _loaded:
        scalar = SCALARS[dtype]
        source = native.kernel_source(_SOURCE, scalar)
        parameters = [p.replace("SCALAR", scalar) for p in _PARAMETERS]
        name = f"paged-attention-{str(dtype).removeprefix('torch.')}"
        kernel = native.load(name, parameters, source, build)
        if kernel is None:
            return False
        _loaded[dtype] = kernel
    return True


def build(dtype: torch.dtype) -> str:
    """The kernel's build, as warm-up work (ModelRunner._warm_up). Where it cannot be built (no C++
    compiler, say), that is said once and steps go on gathering each context: load then stays False."""
    try:
        load(dtype, build=True)
    except Exception as exc:  # noqa: BLE001 - any build failure: serve on the gathering path instead
        first_line = str(exc).strip().split("\n", 1)[0]  # a compile error goes on with the compiler's output
        log.warning("attention's C++ kernel is unavailable (%s: %s): steps gather each context",
                    type(exc).__name__, first_line)  # fmt: skip
        log.debug("building attention's C++ kernel failed", exc_info=True)
        return "no attention kernel: steps gather each context"
    return "attention reads the KV pools in place (our C++ kernel), built"


def kernel_paged_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: PagedLayout,
    scaling: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Causal attention of every packed token over its own sequence's entries in the pool.

    Semantics: as flex_paged_attention (runner/flex.py): ``out[t] = softmax(cap(q[t] · K_s[first:p+1]ᵀ ·
    scaling)) · V_s[first:p+1]``, query head h reading KV head h // G, in float32, rounded once.
    query: [1, Hq, T, D]; keys, values: one layer's pool, [slots, Hkv, D]. Returns [1, T, Hq, D].
    """
    _, num_heads, num_tokens, head_dim = query.shape
    if query.stride(-1) != 1:
        query = query.contiguous()
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or keys.stride() != values.stride():
        raise ValueError("the pool's keys and values must share strides, each row contiguous")
    if query.device.type != "cpu" or keys.device.type != "cpu":
        raise ValueError(f"the paged-attention kernel runs on CPU tensors, not {query.device}")
    if not query.dtype == keys.dtype == values.dtype:  # the kernel reads raw memory
        raise TypeError(f"query {query.dtype}, keys {keys.dtype} and values {values.dtype} differ")
    first = layout.first(window)
    out = query.new_empty(1, num_tokens, num_heads, head_dim)
    if not load(query.dtype, build=True):
        raise TypeError(f"the paged-attention kernel has no {query.dtype} build")
    _loaded[query.dtype](
        query, query.stride(2), query.stride(1), keys, values, keys.stride(0), keys.stride(1), out,
        layout.token_pos, layout.token_row, first, layout.tables, layout.tables.shape[1],
        num_tokens, num_heads, keys.shape[1], head_dim, layout.block_size,
        scaling, softcap or 0.0, bf16_dot, torch.get_num_threads(),
    )  # fmt: skip
    return out
