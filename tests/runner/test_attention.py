"""Ragged paged attention against plain per-sequence attention (its reference semantics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftserve.runner.attention as attention
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import GenerationRequest, SamplingParams
from peftserve.runner.attention import AttentionMetadata, PrefillChunk, paged_attention
from peftserve.runner.flex import PagedLayout, flex_paged_attention, unwritten_tails
from peftserve.runner.kv_cache import PagedKVCache
from peftserve.runner.paged_kernel import kernel_paged_attention
from tests.engine.conftest import random_prompts
from tests.helpers.tiny_models import build_tiny_model

HQ, HKV, D, BS = 4, 2, 8, 4


class _Layer(torch.nn.Module):
    layer_idx = 0


def reference(q, k, v, window=None):
    """Causal attention of one sequence whose last q.shape[1] keys are the queries'. q: [H, n, D]."""
    n, ctx = q.shape[1], k.shape[1]
    qpos = torch.arange(ctx - n, ctx)[:, None]
    kpos = torch.arange(ctx)[None]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    k = k.repeat_interleave(HQ // HKV, 0)
    v = v.repeat_interleave(HQ // HKV, 0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [H, n, D]


def explicit_reference(q, k, v, window=None, softcap=None, sinks=None, scale=0.3):
    """The formula of transformers' eager attention (Gemma 2, GPT-OSS) in float64. q: [H, n, D]."""
    n, ctx = q.shape[1], k.shape[1]
    qpos = torch.arange(ctx - n, ctx)[:, None]
    kpos = torch.arange(ctx)[None]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    q = q.double()
    k, v = (t.repeat_interleave(HQ // HKV, 0).double() for t in (k, v))  # [H, ctx, D]
    scores = q @ k.transpose(1, 2) * scale  # [H, n, ctx]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.double()[:, None, None].expand(HQ, n, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v).float()  # [H, n, D]


IN_PLACE = {"flex": flex_paged_attention, "cpp": kernel_paged_attention}
"""The kernels that read the pool in place, by --attention name."""


def run_case(seqs, window=None, softcap=None, sinks=None, in_place=None, dtype=torch.float32):
    """seqs: (context already cached, new tokens) per sequence; new tokens of 1 with context > 0 decode.

    With softcap or sinks the layer takes the explicit path, checked against explicit_reference. With
    in_place ("flex" or "cpp"), attention reads the pool in place with that kernel, and every slot outside
    the sequences' contexts holds NaN first, as free blocks and unwritten slots may (flex's reads of the
    unwritten value rows in a sequence's last block are zeroed, as the runner does; cpp reads none).
    In bfloat16 the inputs are rounded to it and the result compared with the float32 reference.
    """
    g = torch.Generator().manual_seed(0)
    cache = PagedKVCache(1, 64, BS, HKV, D, dtype, torch.device("cpu"))
    if in_place:
        cache.keys.fill_(float("nan"))
        cache.values.fill_(float("nan"))
        if sinks is not None:  # layers with sinks still gather, padding with the zeroed null slot
            cache.keys[:, cache.null_slot] = cache.values[:, cache.null_slot] = 0
    blocks = iter(torch.randperm(64, generator=g).tolist())
    full_k, full_v, queries, tables, block_tables = [], [], [], [], []
    for cached, new in seqs:
        ctx = cached + new
        table = [next(blocks) for _ in range(-(-ctx // BS))]
        slots = torch.tensor([table[i // BS] * BS + i % BS for i in range(ctx)])
        # rounded to the dtype, so that the float32 reference sees the values the kernel sees
        k = torch.randn(HKV, ctx, D, generator=g).to(dtype).float()
        v = torch.randn(HKV, ctx, D, generator=g).to(dtype).float()
        cache.keys[0, slots[:cached]] = k[:, :cached].transpose(0, 1).to(dtype)
        cache.values[0, slots[:cached]] = v[:, :cached].transpose(0, 1).to(dtype)
        full_k.append(k), full_v.append(v), tables.append(slots)
        block_tables.append(table)
        queries.append(torch.randn(HQ, new, D, generator=g).to(dtype).float())

    slot_map, decode_idx, decode_slots, decode_lens, prefills = [], [], [], [], []
    start = 0
    for (cached, new), slots in zip(seqs, tables, strict=True):
        slot_map.append(slots[cached:])
        if new == 1 and cached > 0:
            decode_idx.append(start)
            decode_slots.append(slots)
            decode_lens.append(cached + 1)
        else:
            prefills.append(PrefillChunk(start, new, cached + new, slots if cached else None))
        start += new
    lmax = max((len(s) for s in decode_slots), default=0)
    meta = AttentionMetadata(
        cache=cache,
        slot_mapping=torch.cat(slot_map),
        decode_token_idx=torch.tensor(decode_idx) if decode_idx else None,
        decode_slots=torch.stack([F.pad(s, (0, lmax - len(s)), value=cache.null_slot) for s in decode_slots])
        if decode_idx
        else None,
        decode_ctx_lens=torch.tensor(decode_lens) if decode_idx else None,
        prefills=prefills,
    )
    if in_place:
        chunks = [(c, n, t) for (c, n), t in zip(seqs, block_tables, strict=True)]
        if in_place == "flex":
            tails = torch.tensor(unwritten_tails(chunks, BS), dtype=torch.long)
            cache.values.index_fill_(1, tails, 0)  # as the runner does
        meta.paged = PagedLayout.build(chunks, BS, cache.keys.shape[1], torch.device("cpu"))
        meta.attend = IN_PLACE[in_place]
    q = torch.cat(queries, dim=1)[None].to(dtype)  # [1, HQ, T, D]
    k_new = torch.cat([k[:, c:] for k, (c, _) in zip(full_k, seqs, strict=True)], dim=1)[None].to(dtype)
    v_new = torch.cat([v[:, c:] for v, (c, _) in zip(full_v, seqs, strict=True)], dim=1)[None].to(dtype)
    cache.update(k_new, v_new, 0, kwargs={"peftserve_attn": meta})
    explicit = softcap is not None or sinks is not None
    extra = {"softcap": softcap, "s_aux": sinks, "scaling": 0.3} if explicit else {}

    out, _ = paged_attention(
        _Layer(), q, k_new, v_new, None, sliding_window=window, peftserve_attn=meta, **extra
    )
    out = out.float()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding (2^-8)

    start = 0
    for (_, new), q_i, k, v in zip(seqs, queries, full_k, full_v, strict=True):
        if explicit:
            want = explicit_reference(q_i, k, v, window, softcap, sinks).transpose(0, 1)  # [n, H, D]
        else:
            want = reference(q_i, k, v, window).transpose(0, 1)  # [n, H, D]
        torch.testing.assert_close(out[0, start : start + new], want.float(), atol=tolerance, rtol=tolerance)
        start += new


def test_decode_rows_fresh_prefills_and_chunks_with_context():
    run_case([(0, 7), (9, 1), (5, 6), (13, 1), (0, 1), (3, 1)])


def test_sliding_window_in_every_path():
    run_case([(0, 11), (14, 1), (6, 9)], window=4)


MIXED = [(0, 7), (9, 1), (5, 6), (13, 1), (0, 1), (3, 1), (0, 12)]
"""Fresh prefills, decode rows and prefill chunks over cached context, in one step."""
SINKS = torch.tensor([0.5, -1.0, 2.0, 0.0])
"""One logit per query head."""


@pytest.mark.parametrize("window", [None, 4])
def test_soft_capping_in_every_path(window):
    # scale 0.3 on unit-variance q, k puts scores around +-2, where a cap of 1.5 bends them
    run_case(MIXED, window=window, softcap=1.5)


@pytest.mark.parametrize("window", [None, 4])
def test_attention_sinks_in_every_path(window):
    run_case(MIXED, window=window, sinks=SINKS)


def test_soft_capping_and_sinks_together():
    run_case(MIXED, window=5, softcap=2.0, sinks=SINKS)


def test_long_prefills_go_by_query_tiles(monkeypatch):
    monkeypatch.setattr(attention, "EXPLICIT_TILE_ELEMENTS", HQ * 16 * 3)  # 3 queries a tile at 16 keys
    run_case([(0, 13), (4, 9), (7, 1)], window=6, softcap=1.5, sinks=SINKS)


def test_the_explicit_path_is_the_eager_formula_and_sdpa_otherwise():
    """Soft-capping and sinks really change the output (so the tests above can fail), and with
    neither the explicit kernel equals SDPA."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, HQ, 5, D, generator=g)
    k, v = torch.randn(2, HKV, 9, D, generator=g), torch.randn(2, HKV, 9, D, generator=g)
    mask = torch.ones(2, 1, 5, 9, dtype=torch.bool).tril(4)
    plain = attention.explicit_attention(q, k, v, mask, 0.3, None, None)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(plain, sdpa, atol=1e-6, rtol=1e-5)
    assert (attention.explicit_attention(q, k, v, mask, 0.3, 1.5, None) - plain).abs().max() > 1e-2
    assert (attention.explicit_attention(q, k, v, mask, 0.3, None, SINKS) - plain).abs().max() > 1e-2


def test_only_decode_rows():
    run_case([(1, 1), (30, 1), (17, 1)])


def test_cache_gather_returns_the_slots_rows_whatever_came_before():
    cache = PagedKVCache(2, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=3, dtype=torch.float32,
                         device=torch.device("cpu"))  # fmt: skip
    cache.keys.copy_(torch.randn_like(cache.keys))
    cache.values.copy_(torch.randn_like(cache.values))
    for layer, slots in [(0, torch.tensor([[5, 0, 7], [1, 1, 2]])), (1, torch.tensor([3, 9])),
                         (1, torch.arange(24).view(4, 6))]:  # fmt: skip
        k, v = cache.gather(layer, slots)
        assert torch.equal(k, cache.keys[layer][slots]) and torch.equal(v, cache.values[layer][slots])


def engine_generates_what_the_gathering_engine_does(family: str, attention: str) -> None:
    """Chunked prefill, late joiners and block-boundary contexts, on `attention` (in place) and on sdpa:
    same tokens, log-probabilities within fp32 rounding. Gemma 2 adds soft-capping and windows on
    alternate layers."""
    prompts = random_prompts([3, 9, 16, 23, 5], 320, seed=11)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=True)
    requests = [
        GenerationRequest(f"r{i}", prompt_token_ids=p, sampling=params) for i, p in enumerate(prompts)
    ]
    runs = {}
    for path in ("sdpa", attention):
        model, tokenizer = build_tiny_model(family)
        config = EngineConfig(kv_cache_mb=1, block_size=4, max_batched_tokens=20, attention=path)
        engine = LLMEngine.from_model(model, tokenizer, config)
        assert (engine.runner.in_place is not None) == (path != "sdpa")
        runs[path] = engine.generate_all(requests)
    for rid, want in runs["sdpa"].items():
        got = runs[attention][rid]
        assert got.token_ids == want.token_ids, rid
        assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True)) <= 1e-5, rid
