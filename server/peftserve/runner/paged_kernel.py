"""The CPU's paged-attention kernel: every packed token attends to its own sequence's entries of the pool,
in one C++ pass per layer (paged_attention.cpp).

Like flex attention in place (runner/flex.py) it reads each token's keys and values where they lie in
the paged pool, through the step's block tables (PagedLayout), and reads each KV head's entries once for
all the query heads that share it. Unlike flex it needs no torch.compile: the library is built once
per dtype by inductor's C++ code cache (1.4-1.5 s of compiling on the 2-core Intel Xeon, plus about 7 s
of inductor's set-up for the first kernel a process builds), kept on disk, and later processes
load it in milliseconds, so a restarted server attends at full speed as soon as its weights are loaded.
And it reads only the entries each token sees: no block is masked, so no value row past a sequence's end is
ever read and nothing needs zeroing before a step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftserve import native
from peftserve.runner.flex import PagedLayout

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
KERNEL = native.Kernel("paged-attention", Path(__file__).with_name("paged_attention.cpp"), _PARAMETERS)


def load(dtype: torch.dtype, build: bool = False) -> bool:
    """Whether the kernel for `dtype` is ready: loaded from this machine's built copy (milliseconds), or
    else built (`build`: see above; peftserve/native.py). False for a dtype it is
    not built for; raises what a build raises."""
    return dtype in native.SCALARS and KERNEL.get(dtype, build) is not None


def build(dtype: torch.dtype) -> str:
    """The kernel's build, as warm-up work (ModelRunner._warm_up), which says what failed (no C++
    compiler, say): before serving, the start stops; in the background, steps go on gathering."""
    load(dtype, build=True)
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
    if query.dtype not in native.SCALARS:
        raise TypeError(f"the paged-attention kernel has no {query.dtype} build")
    KERNEL.get(query.dtype)(
        query, query.stride(2), query.stride(1), keys, values, keys.stride(0), keys.stride(1), out,
        layout.token_pos, layout.token_row, first, layout.tables, layout.tables.shape[1],
        num_tokens, num_heads, keys.shape[1], head_dim, layout.block_size,
        scaling, softcap or 0.0, native.bf16_dot, torch.get_num_threads(),
    )  # fmt: skip
    return out
