"""DESIGN.md benchmark shapes and the useful FLOPs of serving them (plain Python).

bench-tiny is not a DESIGN.md shape: it exists for smoke tests of the harness.

Useful FLOPs (what MFU counts), for a request with prompt length P that generates G tokens:

    tokens fed     = P + G - 1          (the last generated token is never fed back)
    dense          = 2 * N_blocks * tokens fed
    lm_head        = 2 * vocab * hidden * G   (logits only where a token is sampled)
    attention      = 4 * layers * hidden * sum_{i=1..P+G-1} i   (QK^T and AV, causal context i)

N_blocks is the non-embedding parameter count of the transformer blocks (embedding table and lm_head
excluded; the lm_head is counted per sampled token above). Adapter FLOPs are overhead, not useful work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven Linear modules of a Llama block, in PEFT's target_modules spelling."""


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

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        """K and V of one token across all layers, `itemsize` bytes per element (4: float32)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize

    def projection_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of one of the PROJECTIONS."""
        kv = self.kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, self.hidden),
            "k_proj": (kv, self.hidden),
            "v_proj": (kv, self.hidden),
            "o_proj": (self.hidden, self.hidden),
            "gate_proj": (self.intermediate, self.hidden),
            "up_proj": (self.intermediate, self.hidden),
            "down_proj": (self.hidden, self.intermediate),
        }
        if module not in shapes:
            raise ValueError(f"unknown projection {module!r}; expected one of {', '.join(PROJECTIONS)}")
        return shapes[module]

    def lora_params(self, rank: int, targets: Sequence[str]) -> int:
        """Parameters of a rank-`rank` LoRA on `targets` in every layer: r * (in + out) per module."""
        return self.layers * sum(rank * sum(self.projection_shape(m)) for m in targets)


SHAPES = {
    "bench-mid": Shape("bench-mid", hidden=512, intermediate=1408, heads=8, kv_heads=2, layers=8),
    "bench-1b": Shape("bench-1b", hidden=2048, intermediate=5632, heads=16, kv_heads=4, layers=4),
}
"""The shapes of DESIGN.md."""
TINY = Shape("bench-tiny", hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2, vocab=1024)
"""Not a DESIGN.md shape: for smoke tests of the harness."""
LLAMA_7B = Shape("llama-7b", hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32)
"""Not a DESIGN.md shape: Llama-2-7B's, the realistic size for a GPU run (13.5 GB in bfloat16; its
rank-16 LoRA on all 7 projections is 160 MB in float32, on q_proj,v_proj 34 MB)."""
BENCH_SHAPES = {TINY.name: TINY, **SHAPES, LLAMA_7B.name: LLAMA_7B}
"""Every shape `peftserve bench --shape` takes."""


def useful_flops(shape: Shape, prompt_lens: Sequence[int], generated: Sequence[int]) -> float:
    """Useful FLOPs of serving these requests (formula in the module docstring)."""
    total = 0.0
    for p, g in zip(prompt_lens, generated, strict=True):
        fed = p + g - 1
        total += 2 * shape.block_params * fed
        total += 2 * shape.vocab * shape.hidden * g
        total += 4 * shape.layers * shape.hidden * fed * (fed + 1) / 2
    return total
