"""What LoRA on experts costs: one forward step of the mixtral-like shape with expert adapters vs base.

One decode step (32 sequences x 1 token) and one prefill step (32 x 16 tokens) of a full-model forward
on [B, T] through peftserve's AdapterManager (the engine's adapter layers; attention is transformers'
sdpa here), with every sequence on an adapter: LoRA rank 16 on the stacked experts (gate_up_proj,
down_proj) and the router (target_parameters), 1, 8 or 32 distinct adapters (sequence i uses adapter
i % k); and, for scale, rank-16 LoRA on the four attention projections, 32 distinct. "base" is the same
wrapped model with no adapter batch. Times are best-of-N, variants interleaved.

Adapter folders are written in peft's layout for target_parameters (nested `.base_layer` names,
[E*r, in] / [out, r*E] factors), which tests/adapters/test_experts.py checks against peft itself.

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_experts.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FAMILY_SHAPES, build_model  # noqa: E402

from peftserve.adapters import AdapterManager  # noqa: E402

BATCH = 32
STEPS = {"decode": 1, "prefill": 16}
"""Tokens per sequence in each step."""
RANK = 16


def write_adapter(model: torch.nn.Module, out: Path, experts: bool, seed: int) -> Path:
    """A LoRA folder in peft's layout: on the experts and router (target_parameters), or on attention."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def pair(key: str, rows: int, fan_in: int, fan_out: int, cols: int) -> None:
        tensors[f"base_model.model.{key}.lora_A.weight"] = torch.randn(rows, fan_in, generator=gen) * 0.01
        tensors[f"base_model.model.{key}.lora_B.weight"] = torch.randn(fan_out, cols, generator=gen) * 0.01

    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        if experts:
            pair(f"{prefix}.mlp.experts.base_layer", RANK * e, h, 2 * i, RANK * e)  # gate_up_proj
            pair(f"{prefix}.mlp.experts", RANK * e, i, h, RANK * e)  # down_proj
            pair(f"{prefix}.mlp.gate", RANK, h, e, RANK)  # router weight
        else:
            attention = model.model.layers[layer].self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                proj = getattr(attention, name)
                pair(f"{prefix}.self_attn.{name}", RANK, proj.in_features, proj.out_features, RANK)
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    fields = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "bias": "none"}
    if experts:
        fields |= {
            "target_modules": [],
            "target_parameters": ["experts.gate_up_proj", "experts.down_proj", "gate.weight"],
        }
    else:
        fields |= {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    (out / "adapter_config.json").write_text(json.dumps(fields))
    return out


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def register_all(manager: AdapterManager, model: torch.nn.Module, tmp: Path) -> dict[str, list[str]]:
    """Write and register every adapter; returns label -> the adapter names its sequences use."""
    variants: dict[str, list[str]] = {}
    for k in (1, 8, 32):
        names = [f"experts-{k}-{j}" for j in range(k)]
        for j, name in enumerate(names):
            manager.register(name, write_adapter(model, tmp / name, experts=True, seed=j))
        variants[f"experts+router r16, {k} distinct"] = names
    names = [f"attention-{j}" for j in range(32)]
    for j, name in enumerate(names):
        manager.register(name, write_adapter(model, tmp / name, experts=False, seed=100 + j))
    variants["attention q,k,v,o r16, 32 distinct (for scale)"] = names
    return variants


def run(manager: AdapterManager, model: torch.nn.Module, vocab: int, variants: dict, repeats: int) -> None:
    """Time base and every variant in the decode and prefill steps; print the table."""
    print(f"{'step':8} {'adapters':48} {'ms':>9} {'vs base':>8}")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for step, tokens in STEPS.items():
            ids = torch.randint(3, vocab, (BATCH, tokens), generator=gen)  # [B, T]
            keep = torch.tensor([tokens - 1])

            def forward(ids=ids, keep=keep):
                return model(input_ids=ids, logits_to_keep=keep).logits

            manager.set_batch(None)
            base = best_ms(forward, repeats)
            print(f"{step:8} {'base':48} {base:9.1f} {1.0:8.2f}")
            for label, names in variants.items():
                slots = [manager.acquire(names[b % len(names)]) for b in range(BATCH)]
                spans = [(b * tokens, tokens, ((slot, 1.0),)) for b, slot in enumerate(slots)]
                manager.set_batch(manager.build_batch(spans, BATCH * tokens))
                ms = best_ms(forward, repeats)
                manager.set_batch(None)
                for b in range(BATCH):
                    manager.release(names[b % len(names)])
                print(f"{step:8} {label:48} {ms:9.1f} {ms / base:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=["mixtral-like"], default="mixtral-like")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = FAMILY_SHAPES[args.shape]
    model = build_model(shape)
    # 41 adapters of up to 26 MB each stay in host memory for the whole run
    manager = AdapterManager(model, num_slots=40, device="cpu", dtype=torch.float32, host_cache_bytes=8 << 30)
    print(f"{shape.name}: {BATCH} sequences, best of {args.repeats}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        variants = register_all(manager, model, Path(tmp))
        run(manager, model, shape.vocab, variants, args.repeats)


if __name__ == "__main__":
    main()
