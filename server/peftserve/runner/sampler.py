"""Next-token selection for a batch of sequences, each with its own sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftserve.engine.request import SamplingParams


@dataclass
class SampleRow:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    generator: torch.Generator | None
    """The request's own generator (CPU), so its draws do not depend on the rest of the batch."""
    seen_ids: list[int]
    """Prompt and output tokens, for the repetition penalty."""


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Whether every logit of each row is finite: [S, V] -> [S] bool, as `isfinite(logits).all(-1)`.

    A row's max and min are finite exactly when all its values are (both reductions propagate NaN and
    reach an infinity), and on CPU they are two vectorized passes where `isfinite(...).all(-1)`
    materializes a bool per logit and reduces it slowly (the step profile's sampling share,
    benchmarks/README.md)."""
    return logits.amax(dim=-1).isfinite() & logits.amin(dim=-1).isfinite()


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> None:
    """Semantics (as transformers): for each seen token, logit/penalty if > 0 else logit*penalty."""
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    scores = logits.index_select(0, ids)
    logits.index_copy_(0, ids, torch.where(scores > 0, scores / penalty, scores * penalty))


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[float]]:
    """Pick one token per row. logits: [B, V]. Returns token ids and their log-probabilities.

    The log-probability is taken under the distribution the token was drawn from (after the
    repetition penalty, temperature, top-k and top-p; the raw distribution for greedy rows).
    """
    logits = logits.float()
    for i, row in enumerate(rows):
        if row.params.repetition_penalty != 1.0:
            apply_repetition_penalty(logits[i], row.seen_ids, row.params.repetition_penalty)

    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    logprobs = torch.empty(len(rows), dtype=torch.float32, device=logits.device)

    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        g_logits = logits.index_select(0, idx)  # [G, V]
        g_tokens = g_logits.argmax(dim=-1)
        tokens[idx] = g_tokens
        logprobs[idx] = torch.log_softmax(g_logits, dim=-1).gather(1, g_tokens[:, None])[:, 0]

    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        s_tokens, s_logprobs = _sample_rows(logits.index_select(0, idx), [rows[i] for i in sampled])
        tokens[idx] = s_tokens
        logprobs[idx] = s_logprobs
    return tokens.tolist(), logprobs.tolist()


def _sample_rows(logits: torch.Tensor, rows: list[SampleRow]) -> tuple[torch.Tensor, torch.Tensor]:
    # logits: [S, V]
    device = logits.device
    vocab = logits.shape[-1]
    temps = torch.tensor([r.params.temperature for r in rows], device=device)[:, None]
    sorted_logits, order = (logits / temps).sort(dim=-1, descending=True)  # [S, V]
    rank = torch.arange(vocab, device=device)[None, :]

    top_k = torch.tensor([r.params.top_k or vocab for r in rows], device=device)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))

    top_p = torch.tensor([r.params.top_p for r in rows], device=device)[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill((mass_before > top_p) & (rank > 0), float("-inf"))

    probs = torch.softmax(sorted_logits, dim=-1)
    cdf = probs.cumsum(dim=-1)
    # One uniform draw per row from the request's own generator: reproducible under a seed
    # whatever else shares the batch.
    u = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(device)[:, None]
    pick = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=vocab - 1)  # [S, 1]
    tokens = order.gather(1, pick)[:, 0]
    logprobs = torch.log(probs.gather(1, pick)[:, 0])
    return tokens, logprobs
