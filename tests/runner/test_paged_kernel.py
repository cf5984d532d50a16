"""Our C++ paged-attention kernel (--attention cpp) against the references of the gathering path, and the
keeping of built kernels (peftserve/native.py).

Every slot outside the sequences' contexts holds NaN, the null slot and the unwritten rows of each
sequence's last block included: the kernel must read nothing but each token's own entries.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from peftserve import native
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import GenerationRequest, SamplingParams
from peftserve.runner import paged_kernel
from peftserve.runner.flex import PagedLayout, flex_paged_attention
from peftserve.runner.paged_kernel import kernel_paged_attention as attend
from tests.helpers.tiny_models import build_tiny_model
from tests.runner.test_attention import (
    MIXED,
    SINKS,
    engine_generates_what_the_gathering_engine_does,
    run_case,
)

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "seqs",
    [
        [(0, 7), (9, 1), (5, 6), (13, 1), (0, 1), (3, 1)],
        [(1, 1), (30, 1), (17, 1)],  # only decode rows
        [(3, 1)],  # one token
        [(0, 4), (7, 1), (8, 8)],  # contexts ending on a block boundary
    ],
)
def test_decode_rows_fresh_prefills_and_chunks_with_context(seqs, dtype):
    run_case(seqs, in_place="cpp", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [1, 4, 6])
def test_sliding_window(window, dtype):
    run_case(MIXED, window=window, in_place="cpp", dtype=dtype)


@pytest.mark.parametrize("window", [None, 4])
def test_soft_capping(window):
    run_case(MIXED, window=window, softcap=1.5, in_place="cpp")


def test_layers_with_sinks_keep_the_gathering_path():
    run_case(MIXED, window=5, softcap=2.0, sinks=SINKS, in_place="cpp")


def _pool_case(dtype, heads, kv_heads, head_dim, contexts, block_size=16, seed=0):
    """A pool holding one random sequence per context (blocks shuffled), its last token's query each."""
    g = torch.Generator().manual_seed(seed)
    widths = [-(-c // block_size) for c in contexts]
    order = torch.randperm(sum(widths), generator=g).tolist()
    chunks, used = [], 0
    for context, width in zip(contexts, widths, strict=True):
        chunks.append((context - 1, 1, order[used : used + width]))
        used += width
    slots = (sum(widths) + 1) * block_size
    keys = torch.randn(slots, kv_heads, head_dim, generator=g).to(dtype)
    values = torch.randn(slots, kv_heads, head_dim, generator=g).to(dtype)
    query = torch.randn(1, len(contexts), heads, head_dim, generator=g).to(dtype).transpose(1, 2)
    layout = PagedLayout.build(chunks, block_size, slots, torch.device("cpu"))
    return query, keys, values, layout


def _float64_reference(query, keys, values, layout, scaling):
    """Each token's attention over its own entries, from the layout's tables, in float64."""
    group = query.shape[1] // keys.shape[1]
    outs = []
    for t in range(query.shape[2]):
        table, pos = layout.tables[layout.token_row[t]], int(layout.token_pos[t])
        slots = torch.tensor([int(table[j // layout.block_size]) * layout.block_size + j % layout.block_size
                              for j in range(pos + 1)])  # fmt: skip
        k = keys[slots].double().repeat_interleave(group, 1)  # [n, Hq, D]
        v = values[slots].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", query[0, :, t].double(), k) * scaling
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(outs)[None]  # [1, T, Hq, D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("geometry", [(16, 4, 128), (8, 1, 64), (12, 12, 80), (32, 2, 256)])
def test_serving_shapes_against_float64(dtype, geometry):
    """Head sizes of real models (80 is not a multiple of the vector width), groups of 1 to 16 query
    heads per KV head, contexts across many blocks: within the dtype's rounding of float64, and as close
    as flex attention is in float32."""
    heads, kv_heads, head_dim = geometry
    query, keys, values, layout = _pool_case(dtype, heads, kv_heads, head_dim, [1, 17, 200, 64, 333])
    scaling = head_dim**-0.5
    got = attend(query, keys, values, layout, scaling, None, None)
    want = _float64_reference(query, keys, values, layout, scaling)
    assert got.dtype == dtype and got.shape == want.shape
    tolerance = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)


def test_a_tokens_bits_do_not_depend_on_its_step():
    """One token alone, or among others (any threads, any order of work), gives the same bits."""
    query, keys, values, layout = _pool_case(torch.bfloat16, 16, 4, 128, [40, 300, 7, 129, 64])
    together = attend(query, keys, values, layout, 0.1, None, None)
    for t in range(query.shape[2]):
        start, _, blocks = int(layout.token_pos[t]), 1, layout.tables[layout.token_row[t]].tolist()
        alone = PagedLayout.build([(start, 1, blocks)], 16, keys.shape[0], torch.device("cpu"))
        out = attend(query[:, :, t : t + 1], keys, values, alone, 0.1, None, None)
        assert torch.equal(out[0, 0], together[0, t]), t


def test_matches_flex_attention_on_a_serving_step():
    query, keys, values, layout = _pool_case(torch.float32, 16, 4, 128, [24, 511, 130, 16, 257, 3])
    got = attend(query, keys, values, layout, 0.088, 6, 30.0)  # window, cap
    want = flex_paged_attention(query, keys, values, layout, 0.088, 6, 30.0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_wrong_inputs_are_refused_before_the_kernel_reads_them():
    query, keys, values, layout = _pool_case(torch.float32, 4, 2, 8, [5])
    with pytest.raises(TypeError, match="differ"):
        attend(query.double(), keys, values, layout, 1.0, None, None)
    with pytest.raises(TypeError, match="no torch.float64 build"):
        attend(query.double(), keys.double(), values.double(), layout, 1.0, None, None)
    with pytest.raises(ValueError, match="share strides"):
        attend(query, keys, values.transpose(0, 1), layout, 1.0, None, None)


@pytest.mark.parametrize("family", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_an_engine_on_the_kernel_generates_what_the_gathering_engine_does(family):
    engine_generates_what_the_gathering_engine_does(family, "cpp")


# peftserve/native.py: built kernels kept per machine


SOURCE = """
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C" void kernel(float* x, int64_t n, float add) {
  for (int64_t i = 0; i < n; ++i) x[i] += add;
}
"""
PARAMETERS = ["float*", "int64_t", "float"]


def _kept(root):
    return sorted(p.name for p in root.iterdir())


def test_a_built_kernel_is_kept_and_loaded_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTSERVE_KERNEL_CACHE", str(tmp_path))
    assert native.load("add", PARAMETERS, SOURCE, build=False) is None  # nothing kept, nothing built
    kernel = native.load("add", PARAMETERS, SOURCE)
    x = torch.zeros(3)
    kernel(x, 3, 1.5)
    assert x.tolist() == [1.5] * 3
    (kept,) = _kept(tmp_path)
    assert kept.startswith("add-") and kept.endswith(".so")

    def no_build(*args, **kwargs):
        raise AssertionError("built again")

    from torch._inductor.codecache import CppPythonBindingsCodeCache

    building = CppPythonBindingsCodeCache.load_pybinding
    monkeypatch.setattr(CppPythonBindingsCodeCache, "load_pybinding", no_build)
    again = native.load("add", PARAMETERS, SOURCE, build=False)
    again(x, 3, 1.0)
    assert x.tolist() == [2.5] * 3
    changed = SOURCE.replace("+=", "-=")
    assert native.load("add", PARAMETERS, changed, build=False) is None  # another source: not that copy
    monkeypatch.setattr(CppPythonBindingsCodeCache, "load_pybinding", building)
    native.load("add", PARAMETERS, changed)(x, 3, 0.5)
    assert x.tolist() == [2.0] * 3
    (replaced,) = _kept(tmp_path)  # the old source's copy is gone
    assert replaced != kept and replaced.startswith("add-")


def test_a_damaged_copy_is_removed_and_built_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PEFTSERVE_KERNEL_CACHE", str(tmp_path))
    source = SOURCE.replace("x[i] += add", "x[i] += 2 * add")  # a library this process has not imported
    native.load("twice", PARAMETERS, source)
    (kept,) = tmp_path.iterdir()
    kept.write_bytes(kept.read_bytes()[:1000])  # truncated
    with caplog.at_level(logging.WARNING, logger="peftserve.native"):
        assert native.load("twice", PARAMETERS, source, build=False) is None
    assert "did not load" in caplog.text and _kept(tmp_path) == []
    kernel = native.load("twice", PARAMETERS, source)
    x = torch.zeros(2)
    kernel(x, 2, 1.0)
    assert x.tolist() == [2.0, 2.0] and len(_kept(tmp_path)) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_directory_only_costs_the_next_start_its_build(tmp_path, monkeypatch):
    root = tmp_path / "kernels"
    root.mkdir(mode=0o500)
    monkeypatch.setenv("PEFTSERVE_KERNEL_CACHE", str(root))
    kernel = native.load("add", PARAMETERS, SOURCE)
    x = torch.zeros(1)
    kernel(x, 1, 1.0)
    assert x.tolist() == [1.0] and _kept(root) == []


def test_a_file_in_the_way_only_costs_the_next_start_its_build(tmp_path, monkeypatch):
    blocked = tmp_path / "kernels"
    blocked.write_text("not a directory")
    monkeypatch.setenv("PEFTSERVE_KERNEL_CACHE", str(blocked))
    kernel = native.load("add", PARAMETERS, SOURCE)
    x = torch.zeros(1)
    kernel(x, 1, 2.0)
    assert x.tolist() == [2.0]


def test_where_the_kernel_cannot_be_built_a_start_before_serving_stops_and_one_beside_gathers(
    tmp_path, monkeypatch, caplog
):
    """As a failed compile of flex does (test_warm_up.py): the warm-up's failure mechanism, nothing of
    the kernel's own."""
    monkeypatch.setenv("PEFTSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(paged_kernel.KERNEL, "_loaded", {})  # as in a new process

    def no_compiler(name, parameters, source, build=True):
        if build:
            raise RuntimeError("no C++ compiler")
        return None

    monkeypatch.setattr(native, "load", no_compiler)

    def engine(warm_up: str) -> LLMEngine:
        model, tokenizer = build_tiny_model("llama")
        config = EngineConfig(kv_cache_mb=1, block_size=4, attention="cpp", warm_up=warm_up)
        return LLMEngine.from_model(model, tokenizer, config)

    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        engine("before")
    beside = engine("background")
    assert beside.runner.wait_warm_up(timeout=300)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with caplog.at_level(logging.WARNING, logger="peftserve.runner.model_runner"):
        done = beside.generate_all([GenerationRequest("r", prompt_token_ids=[5, 6, 7], sampling=params)])
    assert "serving on without attention (its warm-up failed)" in caplog.text
    assert beside.runner.in_place is None and len(done["r"].token_ids) == 6
