"""Triton kernels of the compute forms, over a step's KernelPlan (plan.py) and a layer's slot table.

Every kernel reads the same plan: tiles of at most BLOCK_M token rows of one signature group, each group
with its (slot, weight) pairs. A layer's slots are reached through its slot table ([num_slots, TABLE_W]
int64, ops.py), whose row holds data pointers and sizes (sizes read as int32, so that loop-carried values
keep one type when compiled), so each slot keeps its own rank and its own tensors: nothing is padded to
the step's largest rank, and one launch serves every adapter of the step.
A program skips its tile when no pair of the tile's group holds a delta here, so rows of tokens whose
adapters do not touch this layer, like rows of no adapter, are never written.

Products accumulate in float32 and each output element is rounded once. fp32 operands of tl.dot ask for
"ieee" precision (Triton's default on CUDA is tf32, too coarse for fidelity). Triton's interpreter
(TRITON_INTERPRET=1) multiplies bfloat16 dot operands as raw bits and does no bf16 arithmetic
(triton-lang/triton#11584), so under it UPCAST feeds tl.dot float32 copies of bf16 operands; bf16 x bf16
products are exact in float32, so this is the tensor cores' arithmetic up to the order of summation.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Columns of a slot-table row (ops.py fills them).
COL_A: tl.constexpr = 0  # shrink operand: A [r, in] (row stride COL_A_STRIDE)
COL_K: tl.constexpr = 1  # inner size: the rank (low rank), in_features (dense, Kronecker); 0: no delta
COL_A_STRIDE: tl.constexpr = 2
COL_NO_BIAS: tl.constexpr = 2  # scaling forms: 1 when the slot scales W x only, without the bias (DoRA)
COL_VEC_A: tl.constexpr = 3  # VeRA's lambda_d [r]
COL_B: tl.constexpr = 4  # expand operand: B [out, r], W [out, in] or the Kronecker factor w1 [a, c]
COL_VEC_B: tl.constexpr = 5  # VeRA's lambda_b [out]; a scaling form's vector
COL_W2: tl.constexpr = 6  # Kronecker factor w2 [b, d]
COL_KB: tl.constexpr = 7  # b, rows of w2; sparse: pointer to the CSR row starts [out + 1]
COL_KD: tl.constexpr = 8  # d, columns of w2; sparse: pointer to the column of each entry [k]
TABLE_W: tl.constexpr = 9

STEP_SIZES = ["num_tiles", "num_groups", "num_pairs"]
"""Arguments that change every step: not specialized on (Triton would compile a variant for value 1)."""


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _ptr(row, col, like):
    """The pointer in a slot-table column, typed as `like`'s elements."""
    return tl.load(row + col).to(tl.pointer_type(like.dtype.element_ty))


@triton.jit
def _tile(tiles_ptr, num_tiles, groups_ptr, num_groups):
    """(first row in tokens, rows, group's first pair, group's pairs, offset in the group) of this tile."""
    tile = tl.program_id(0)
    first = tl.load(tiles_ptr + tile)
    rows = tl.load(tiles_ptr + num_tiles + tile)
    group = tl.load(tiles_ptr + 2 * num_tiles + tile)
    offset = tl.load(tiles_ptr + 3 * num_tiles + tile)
    pair0 = tl.load(groups_ptr + group)
    npairs = tl.load(groups_ptr + num_groups + group)
    return first, rows, pair0, npairs, offset


@triton.jit(do_not_specialize=STEP_SIZES)
def shrink_kernel(
    x_ptr, h_ptr, tokens_ptr, tiles_ptr, groups_ptr, pairs_ptr, table_ptr,
    num_tiles, num_groups, num_pairs, in_features, x_stride, h_stride,
    HAS_VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Low-rank shrink, grid (tiles, max pairs, rank blocks).

    Semantics: for every group g, pair p = (s, w) of g and token t of g (its i-th),
        h[first_h(p) + i, :r(s)] = x[t] @ A[s].T          (* lambda_d[s] when HAS_VEC: VeRA)
    in float32; columns past r(s) and pairs of slots without a delta here are not written.
    """
    first, rows, pair0, npairs, offset = _tile(tiles_ptr, num_tiles, groups_ptr, num_groups)
    j = tl.program_id(1)
    r0 = tl.program_id(2) * BLOCK_R
    if j >= npairs:
        return
    slot = tl.load(pairs_ptr + pair0 + j)
    h_first = tl.load(pairs_ptr + num_pairs + pair0 + j) + offset
    row = table_ptr + slot * TABLE_W
    rank = tl.load(row + COL_K).to(tl.int32)
    if r0 >= rank:
        return
    a_ptr = _ptr(row, COL_A, x_ptr)
    a_stride = tl.load(row + COL_A_STRIDE)

    m = tl.arange(0, BLOCK_M)
    m_ok = m < rows
    tok = tl.load(tokens_ptr + first + m, mask=m_ok, other=0).to(tl.int64)
    r = r0 + tl.arange(0, BLOCK_R)
    r_ok = r < rank
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + kk
        k_ok = k < in_features
        xs = tl.load(
            x_ptr + tok[:, None] * x_stride + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        a_at = a_ptr + r[None, :].to(tl.int64) * a_stride + k[:, None]
        a_t = tl.load(a_at, mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]: A.T
        acc = _dot(xs, a_t, acc, UPCAST)  # [BLOCK_M, BLOCK_R]
    if HAS_VEC:
        vec = tl.load(_ptr(row, COL_VEC_A, x_ptr) + r, mask=r_ok, other=0.0).to(tl.float32)
        acc = acc * vec[None, :]
    h_rows = (h_first + m).to(tl.int64)
    tl.store(h_ptr + h_rows[:, None] * h_stride + r[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _kron_block(row, w_ptr, n, n_ok, k, k_ok, in_features):
    """[BLOCK_K, BLOCK_N] block of kron(w1, w2).T: dW[n, k] = w1[n // b, k // d] * w2[n % b, k % d]."""
    b = tl.load(row + COL_KB).to(tl.int32)
    d = tl.load(row + COL_KD).to(tl.int32)
    c = in_features // d
    w1 = _ptr(row, COL_B, w_ptr)
    w2 = _ptr(row, COL_W2, w_ptr)
    ok = k_ok[:, None] & n_ok[None, :]
    f1 = tl.load(w1 + (n[None, :] // b) * c + k[:, None] // d, mask=ok, other=0.0).to(tl.float32)
    f2 = tl.load(w2 + (n[None, :] % b) * d + k[:, None] % d, mask=ok, other=0.0).to(tl.float32)
    return (f1 * f2).to(w_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=STEP_SIZES)
def expand_kernel(
    y_ptr, h_ptr, w_ptr, tokens_ptr, tiles_ptr, groups_ptr, pairs_ptr, weights_ptr, table_ptr,
    num_tiles, num_groups, num_pairs, out_features, y_stride, h_stride,
    H_IS_X: tl.constexpr, HAS_VEC: tl.constexpr, KRON: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Low-rank expand, and the dense and Kronecker forms; grid (tiles, output blocks).

    Semantics: for every group g and token t of g (its i-th),
        y[t] += sum_{p = (s, w) in g} w * (h_p[i, :K(s)] @ M[s].T)      (* lambda_b[s] when HAS_VEC)
    with h_p = h[first_h(p):] and M[s] = B[s] [out, r] (low rank, K = r), or h_p = x[tokens of g] and
    M[s] = W[s] [out, in] (dense, H_IS_X) or kron(w1[s], w2[s]) built block by block (KRON, H_IS_X).
    w_ptr types the slots' tensors (the model dtype). Rows whose pairs hold no delta here are not written.
    """
    first, rows, pair0, npairs, offset = _tile(tiles_ptr, num_tiles, groups_ptr, num_groups)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < rows
    tok = tl.load(tokens_ptr + first + m, mask=m_ok, other=0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < out_features
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    touched = 0
    for j in range(0, npairs):
        slot = tl.load(pairs_ptr + pair0 + j)
        weight = tl.load(weights_ptr + pair0 + j)
        row = table_ptr + slot * TABLE_W
        inner = tl.load(row + COL_K).to(tl.int32)
        touched += inner
        if H_IS_X:
            h_rows = tok
        else:
            h_rows = (tl.load(pairs_ptr + num_pairs + pair0 + j) + offset + m).to(tl.int64)
        m_ptr = _ptr(row, COL_B, w_ptr)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inner, BLOCK_K):
            k = k0 + kk
            k_ok = k < inner
            h_at = h_ptr + h_rows[:, None] * h_stride + k[None, :]
            hs = tl.load(h_at, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            if KRON:
                m_t = _kron_block(row, w_ptr, n, n_ok, k, k_ok, inner)
            else:
                m_at = m_ptr + n[None, :].to(tl.int64) * inner + k[:, None]
                m_t = tl.load(m_at, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            part = _dot(hs.to(w_ptr.dtype.element_ty), m_t, part, UPCAST)  # [BLOCK_M, BLOCK_N]
        if HAS_VEC:
            vec_ok = n < out_features * tl.minimum(inner, 1)  # (the interpreter masks with blocks only)
            vec = tl.load(_ptr(row, COL_VEC_B, w_ptr) + n, mask=vec_ok, other=0.0).to(tl.float32)
            part = part * vec[None, :]
        acc += part * weight
    ok = (m < rows * tl.minimum(touched, 1))[:, None] & n_ok[None, :]  # no delta here: not written
    at = y_ptr + tok[:, None] * y_stride + n[None, :]
    y = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    tl.store(at, (y + acc).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["num_tiles", "num_groups"])
def sparse_kernel(
    y_ptr, x_ptr, tokens_ptr, tiles_ptr, groups_ptr, pairs_ptr, weights_ptr, table_ptr,
    num_tiles, num_groups, out_features, y_stride, x_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Sparse deltas, from each slot's entries sorted by output row (CSR); grid (tiles, output blocks).

    Semantics: for every group g, token t of g and output feature o,
        y[t, o] += sum_{(s, w) in g} w * sum_{entries i of s with rows[i] == o} values[i] * x[t, cols[i]]
    Each program owns its block of output features, so duplicates accumulate without atomics.
    """
    first, rows, pair0, npairs, offset = _tile(tiles_ptr, num_tiles, groups_ptr, num_groups)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < rows
    tok = tl.load(tokens_ptr + first + m, mask=m_ok, other=0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < out_features
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    touched = 0
    for j in range(0, npairs):
        slot = tl.load(pairs_ptr + pair0 + j)
        weight = tl.load(weights_ptr + pair0 + j)
        row = table_ptr + slot * TABLE_W
        present = tl.load(row + COL_K).to(tl.int32)
        touched += present
        if present > 0:
            starts_ptr = _ptr(row, COL_KB, table_ptr)
            cols_ptr = _ptr(row, COL_KD, table_ptr)
            values_ptr = _ptr(row, COL_B, x_ptr)
            start = tl.load(starts_ptr + n, mask=n_ok, other=0)
            count = tl.load(starts_ptr + n + 1, mask=n_ok, other=0) - start  # [BLOCK_N]
            for e in range(0, tl.max(count, axis=0)):
                e_ok = n_ok & (e < count)
                col = tl.load(cols_ptr + start + e, mask=e_ok, other=0)
                value = tl.load(values_ptr + start + e, mask=e_ok, other=0.0).to(tl.float32)
                x_at = x_ptr + tok[:, None] * x_stride + col[None, :]
                xs = tl.load(x_at, mask=m_ok[:, None] & e_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_N]
                acc += xs.to(tl.float32) * (value * weight)[None, :]
    ok = (m < rows * tl.minimum(touched, 1))[:, None] & n_ok[None, :]  # no delta here: not written
    at = y_ptr + tok[:, None] * y_stride + n[None, :]
    y = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    tl.store(at, (y + acc).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["num_tiles", "num_groups"])
def scale_kernel(
    y_ptr, src_ptr, bias_ptr, tokens_ptr, tiles_ptr, groups_ptr, pairs_ptr, weights_ptr, table_ptr,
    num_tiles, num_groups, features, y_stride, src_stride,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Row scaling (IA³, DoRA's magnitude); grid (tiles, feature blocks).

    Semantics: for every group g and token t of g,
        y[t] += sum_{(s, w) in g} w * v[s] * (src[t] - (bias if HAS_BIAS and slot s excludes it else 0))
    elementwise over the features. src is read before y is written, so it may be y itself.
    """
    first, rows, pair0, npairs, offset = _tile(tiles_ptr, num_tiles, groups_ptr, num_groups)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < rows
    tok = tl.load(tokens_ptr + first + m, mask=m_ok, other=0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < features
    ok = m_ok[:, None] & n_ok[None, :]
    src = tl.load(src_ptr + tok[:, None] * src_stride + n[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    touched = 0
    for j in range(0, npairs):
        slot = tl.load(pairs_ptr + pair0 + j)
        weight = tl.load(weights_ptr + pair0 + j)
        row = table_ptr + slot * TABLE_W
        present = tl.load(row + COL_K).to(tl.int32)
        touched += present
        vec_ok = n < features * present
        vec = tl.load(_ptr(row, COL_VEC_B, src_ptr) + n, mask=vec_ok, other=0.0).to(tl.float32)
        term = src
        if HAS_BIAS:
            without = tl.load(row + COL_NO_BIAS)
            term = src - bias[None, :] * without.to(tl.float32)
        acc += term * (vec * weight)[None, :]
    ok = (m < rows * tl.minimum(touched, 1))[:, None] & n_ok[None, :]
    at = y_ptr + tok[:, None] * y_stride + n[None, :]
    y = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    tl.store(at, (y + acc).to(y_ptr.dtype.element_ty), mask=ok)
