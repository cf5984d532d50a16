"""DESIGN.md benchmark shapes and the useful FLOPs of serving them (plain Python).

bench-tiny is not a DESIGN.md shape: it exists for smoke tests of the harness.

Useful FLOPs (what MFU counts), for a request with prompt length P that generates G tokens:

    tokens fed     = P + G - 1          (the last generated token is never fed back)
    dense          = 2 * N_blocks * tokens fed
    lm_head        = 2 * vocab * hidden * G   (logits only where a token is sampled)
    attention      = 4 * layers * heads * head_dim * sum_{i=1..P+G-1} i   (QK^T and AV, causal context i)

N_blocks is the non-embedding parameter count of the transformer blocks a token goes through (embedding
table and lm_head excluded; the lm_head is counted per sampled token above): in a mixture of experts,
its experts_per_token experts of each layer, not all of them. Adapter FLOPs are overhead, not useful work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven Linear modules of a Llama block, in PEFT's target_modules spelling."""


@dataclass(frozen=True)
class Shape:
    """A benchmark shape (DESIGN.md, 'Benchmark shapes'): Llama's architecture unless `family` says."""

    name: str
    hidden: int
    intermediate: int
    """The MLP's width; in a mixture of experts, each expert's."""
    heads: int
    kv_heads: int
    layers: int
    vocab: int = 32000
    family: str = "llama"
    """The transformers model_type built for it: llama, gemma2 or mixtral."""
    explicit_head_dim: int | None = None
    """head_dim when it is not hidden / heads (Gemma 2's 256)."""
    experts: int = 0
    """Experts per layer (0: one dense MLP)."""
    experts_per_token: int = 0

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.heads

    @property
    def _attention_params(self) -> int:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return 2 * self.hidden * q + 2 * self.hidden * kv

    @property
    def _norms_per_layer(self) -> int:
        return 4 if self.family == "gemma2" else 2  # Gemma 2 norms both sides of attention and MLP

    def _block_params(self, experts: int) -> int:
        mlp = 3 * self.hidden * self.intermediate * max(experts, 1)
        router = self.experts * self.hidden
        per_layer = self._attention_params + mlp + router + self._norms_per_layer * self.hidden
        return self.layers * per_layer + self.hidden

    @property
    def block_params(self) -> int:
        """Parameters of the transformer blocks (projections, experts, routers and norms), without
        embeddings or lm_head."""
        return self._block_params(self.experts)

    @property
    def active_block_params(self) -> int:
        """block_params a token goes through: experts_per_token experts of each layer, not all."""
        return self._block_params(self.experts_per_token) if self.experts else self.block_params

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        """K and V of one token across all layers, `itemsize` bytes per element (4: float32)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize

    def projection_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of one of the PROJECTIONS."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        shapes = {
            "q_proj": (q, self.hidden),
            "k_proj": (kv, self.hidden),
            "v_proj": (kv, self.hidden),
            "o_proj": (self.hidden, q),
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
GEMMA2_LIKE = Shape(
    "gemma2-like",
    hidden=2304,
    intermediate=9216,
    heads=8,
    kv_heads=4,
    layers=4,
    family="gemma2",
    explicit_head_dim=256,
)
"""Not a DESIGN.md shape: four layers of Gemma-2-2B (head_dim 256, soft-caps 50/30, sliding window 4096
on every other layer, tied embeddings), with the other shapes' 32k vocabulary."""
MIXTRAL_LIKE = Shape(
    "mixtral-like",
    hidden=1024,
    intermediate=3584,
    heads=8,
    kv_heads=2,
    layers=4,
    family="mixtral",
    explicit_head_dim=128,
    experts=8,
    experts_per_token=2,
)
"""Not a DESIGN.md shape: Mixtral-8x7B's layer at a quarter of its width (8 experts, top-2, head_dim 128,
GQA 4:1), four layers: 363M block parameters, 99M of them active per token."""
FAMILY_SHAPES = {GEMMA2_LIKE.name: GEMMA2_LIKE, MIXTRAL_LIKE.name: MIXTRAL_LIKE}
"""Shapes of other families for the engine benchmark (benchmarks/bench_engine.py)."""
BENCH_SHAPES = {TINY.name: TINY, **SHAPES, LLAMA_7B.name: LLAMA_7B}
"""Every shape `peftserve bench --shape` takes (its adapters target Llama's projections)."""


def useful_flops(shape: Shape, prompt_lens: Sequence[int], generated: Sequence[int]) -> float:
    """Useful FLOPs of serving these requests (formula in the module docstring)."""
    total = 0.0
    for p, g in zip(prompt_lens, generated, strict=True):
        fed = p + g - 1
        total += 2 * shape.active_block_params * fed
        total += 2 * shape.vocab * shape.hidden * g
        total += 4 * shape.layers * shape.heads * shape.head_dim * fed * (fed + 1) / 2
    return total
