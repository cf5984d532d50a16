"""Shared benchmark code: DESIGN.md shapes, random-weight models, seeded workloads, FLOPs and MFU, tables.

Useful FLOPs (what MFU counts), for a request with prompt length P that generates G tokens:

    tokens fed     = P + G - 1          (the last generated token is never fed back)
    dense          = 2 * N_blocks * tokens fed
    lm_head        = 2 * vocab * hidden * G   (logits only where a token is sampled)
    attention      = 4 * layers * hidden * sum_{i=1..P+G-1} i   (QK^T and AV, causal context i)

N_blocks is the non-embedding parameter count of the transformer blocks (embedding table and lm_head
excluded; the lm_head is counted per sampled token above). MFU = useful FLOPs/s divided by the dense
matmul rate measured in the same run on the same device and dtype (2 * n^3 per n x n matmul).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peftserve.model.tokenizer import build_byte_level_tokenizer


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture benchmark shape (DESIGN.md, 'Benchmark shapes')."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def block_params(self) -> int:
        """Parameters of the transformer blocks (projections and norms), without embeddings or lm_head."""
        kv = self.kv_heads * self.head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp + 2 * self.hidden) + self.hidden

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """K and V of one token across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype.itemsize


SHAPES = {
    "bench-mid": Shape("bench-mid", hidden=512, intermediate=1408, heads=8, kv_heads=2, layers=8),
    "bench-1b": Shape("bench-1b", hidden=2048, intermediate=5632, heads=16, kv_heads=4, layers=4),
}


def llama_config(shape: Shape, max_positions: int = 2048) -> LlamaConfig:
    """The shape's config; no EOS, so every system generates exactly max_new_tokens."""
    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        num_hidden_layers=shape.layers,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )


def build_model(
    shape: Shape, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> LlamaForCausalLM:
    """A seeded random-weight model of `shape` (sdpa, eval, frozen); weights do not change speed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(llama_config(shape), dtype=dtype, attn_implementation="sdpa")
    model.generation_config = GenerationConfig(pad_token_id=0)
    return model.to(device).eval().requires_grad_(False)


def bench_tokenizer() -> PreTrainedTokenizerFast:
    """Any tokenizer works for random ids; ids it lacks decode to nothing."""
    return build_byte_level_tokenizer(1024)


def make_prompts(
    n: int, min_len: int, max_len: int, id_range: tuple[int, int], seed: int = 0
) -> list[list[int]]:
    """n prompts of uniform length in [min_len, max_len], uniform random ids in [lo, hi)."""
    rng = random.Random(seed)
    lo, hi = id_range
    return [[rng.randrange(lo, hi) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def useful_flops(shape: Shape, prompt_lens: Sequence[int], generated: Sequence[int]) -> float:
    """Useful FLOPs of serving these requests (formula in the module docstring)."""
    total = 0.0
    for p, g in zip(prompt_lens, generated, strict=True):
        fed = p + g - 1
        total += 2 * shape.block_params * fed
        total += 2 * shape.vocab * shape.hidden * g
        total += 4 * shape.layers * shape.hidden * fed * (fed + 1) / 2
    return total


def synchronize(device: str) -> None:
    """Wait for queued device work so wall-clock times are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(
    device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 2.0
) -> float:
    """Dense n x n @ n x n FLOP/s on this device and dtype, repeated for about `seconds`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, kernel selection
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and reps >= 3:
            return 2 * n**3 * reps / elapsed


@dataclass
class Result:
    """One system's run on one workload; tokens_per_s is None when the system was skipped."""

    system: str
    shape: str
    requests: int
    generated_tokens: int = 0
    seconds: float = 0.0
    useful_flops: float = 0.0
    note: str = ""

    @property
    def tokens_per_s(self) -> float | None:
        return self.generated_tokens / self.seconds if self.seconds > 0 else None

    def mfu(self, peak_flops: float) -> float | None:
        return self.useful_flops / self.seconds / peak_flops if self.seconds > 0 else None


def timed(device: str, fn: Callable[[], list[int]]) -> tuple[list[int], float]:
    """Run fn (which returns tokens generated per request) and the wall time it took."""
    synchronize(device)
    start = time.perf_counter()
    generated = fn()
    synchronize(device)
    return generated, time.perf_counter() - start


def format_table(results: Sequence[Result], peak_flops: float, baseline: str) -> str:
    """A text table: system, tokens/s, ratio to the baseline system, MFU, notes."""
    base = next((r.tokens_per_s for r in results if r.system == baseline and r.tokens_per_s), None)
    rows = [("system", "tok/s", f"vs {baseline}", "MFU", "seconds", "note")]
    for r in results:
        tps, mfu = r.tokens_per_s, r.mfu(peak_flops)
        rows.append(
            (
                r.system,
                f"{tps:.1f}" if tps else "-",
                f"{tps / base:.2f}x" if tps and base else "-",
                f"{mfu:.1%}" if mfu is not None else "-",
                f"{r.seconds:.1f}" if r.seconds else "-",
                r.note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def result_dict(result: Result, peak_flops: float) -> dict[str, object]:
    """A result as JSON-ready data, derived fields included."""
    return {**asdict(result), "tokens_per_s": result.tokens_per_s, "mfu": result.mfu(peak_flops)}


def write_json(path: Path, payload: dict[str, object]) -> None:
    """Write the run's JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def environment(device: str) -> dict[str, object]:
    """What the numbers were measured on."""
    import transformers

    info: dict[str, object] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
