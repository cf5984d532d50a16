"""Engine throughput (generated tokens/s) of peftserve against three transformers baselines, same run.

Systems, all greedy on the same seeded workload of random-id prompts, EOS ignored:
  peftserve       LLMEngine.step() loop (continuous batching, paged KV, attention in place: flex)
  peftserve-sdpa  the same engine with --attention sdpa (each context gathered, then SDPA)
  hf-sequential   model.generate, one request at a time
  hf-static-N     model.generate on left-padded static batches of N requests, in arrival order
  hf-cb           model.generate_batch (transformers' own continuous batching)
  vllm            opt-in: vLLM's CPU build from the peer virtualenv (`make peer-vllm`), on the same model
                  saved to a directory, over its OpenAI API (streamed completions on the same token ids)

Run: PYTHONPATH=server:client:. python benchmarks/bench_engine.py [--quick] [--shape bench-mid|bench-1b|both]
     [--systems peftserve hf-cb vllm]
Other families: --shape gemma2-like (Gemma-2-2B layers: soft-caps, windows) or mixtral-like (8 experts).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    FAMILY_SHAPES,
    SHAPES,
    Result,
    Shape,
    add_vllm_arguments,
    bench_tokenizer,
    build_model,
    environment,
    format_table,
    make_prompts,
    matmul_rate,
    result_dict,
    timed,
    useful_flops,
    write_json,
)

SYSTEMS = ("peftserve", "peftserve-sdpa", "hf-sequential", "hf-static", "hf-cb", "vllm")
DEFAULT_SYSTEMS = SYSTEMS[:5]
"""vllm is opt-in: it needs the peer virtualenv."""


@dataclass(frozen=True)
class Workload:
    """The seeded requests every system serves."""

    prompts: list[list[int]]
    max_new_tokens: int

    @property
    def max_tokens(self) -> int:
        return max(len(p) for p in self.prompts) + self.max_new_tokens


def greedy_config(max_new_tokens: int) -> GenerationConfig:
    """A fresh config each call: generate_batch mutates the one it is given."""
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def run_peftserve(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    shape: Shape,
    work: Workload,
    args: argparse.Namespace,
    attention: str = "flex",
) -> list[int]:
    """Serve the workload through the engine's sync API; tokens generated per request."""
    from peftserve.config import EngineConfig
    from peftserve.engine.engine import LLMEngine
    from peftserve.engine.request import GenerationRequest, SamplingParams

    # Room for every request at once, so admission never waits on KV blocks; the same pool for the
    # warm-up, so that attention in place is compiled for it there.
    kv_mb = args.requests * (args.max_prompt + args.max_new_tokens) * shape.kv_bytes_per_token() / 2**20
    config = EngineConfig(
        warm_up="before",
        device=args.device,
        dtype=args.dtype,
        cuda_graphs=args.cuda_graphs,
        kv_cache_mb=max(64.0, 1.25 * kv_mb),
        max_running=max(len(work.prompts), 1),
        max_batched_tokens=args.max_batched_tokens,
        block_size=args.block_size,
        attention=attention,
    )
    engine = LLMEngine.from_model(model, tokenizer, config)
    sampling = SamplingParams(max_new_tokens=work.max_new_tokens, ignore_eos=True)
    for i, prompt in enumerate(work.prompts):
        engine.add_request(GenerationRequest(request_id=str(i), prompt_token_ids=prompt, sampling=sampling))
    generated = dict.fromkeys(map(str, range(len(work.prompts))), 0)
    while engine.has_unfinished():
        for out in engine.step():
            generated[out.request_id] += len(out.token_ids)
    return list(generated.values())


def run_hf_sequential(model: PreTrainedModel, work: Workload) -> list[int]:
    """model.generate on each request alone."""
    generated = []
    for prompt in work.prompts:
        ids = torch.tensor([prompt], device=model.device)  # [1, P]
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=greedy_config(work.max_new_tokens)
        )
        generated.append(out.shape[1] - ids.shape[1])
    return generated


def run_hf_static(model: PreTrainedModel, work: Workload, batch_size: int) -> list[int]:
    """model.generate on left-padded batches of batch_size, in arrival order (each waits for its longest)."""
    generated = []
    for start in range(0, len(work.prompts), batch_size):
        batch = work.prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=model.device)  # [B, W]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        out = model.generate(ids, attention_mask=mask, generation_config=greedy_config(work.max_new_tokens))
        generated += [out.shape[1] - width] * len(batch)
    return generated


def run_hf_cb(model: PreTrainedModel, work: Workload) -> list[int]:
    """transformers' continuous batching, model.generate_batch."""
    outputs = model.generate_batch(
        work.prompts, generation_config=greedy_config(work.max_new_tokens), progress_bar=False
    )
    failed = [rid for rid, out in outputs.items() if out.error is not None]
    if failed or len(outputs) != len(work.prompts):
        raise RuntimeError(f"generate_batch returned {len(outputs)} results, failed: {failed}")
    return [len(out.generated_tokens) for out in outputs.values()]


class VllmPeer:
    """vLLM on the benchmark's model (saved with its tokenizer at construction, before the engine takes the
    model over), its server started at the first workload and kept for the next ones."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, shape: Shape, max_tokens: int, args
    ) -> None:
        from peftserve.bench.vllm_system import VllmSpec
        from peftserve.model.tokenizer import save_tokenizer

        self._dir = tempfile.TemporaryDirectory(prefix="bench-engine-vllm-")
        model_dir = Path(self._dir.name) / "model"
        model.save_pretrained(model_dir)
        save_tokenizer(tokenizer, model_dir)
        kv_gib = args.requests * (max_tokens + 16) * shape.kv_bytes_per_token() / 2**30
        self.spec = VllmSpec(
            python=Path(args.vllm_python),
            model_dir=model_dir,
            dtype="float32",
            max_num_seqs=args.requests,
            max_model_len=max_tokens + 16,
            kv_cache_gib=1.25 * kv_gib,
            threads=args.vllm_threads,
            preload=tuple(map(Path, args.vllm_preload)),
        )
        self._server = None

    def __call__(self, work: Workload) -> list[int]:
        from peftserve.bench import http_system
        from peftserve.bench.vllm_system import VllmServer
        from peftserve.bench.workload import TraceRequest

        if self._server is None:
            self._server = VllmServer(self.spec, Path(self._dir.name) / "vllm.log")
            self._server.wait_ready(900.0)
        trace = [TraceRequest(i, 0.0, 0, tuple(p), work.max_new_tokens) for i, p in enumerate(work.prompts)]
        records = http_system.run_trace(self._server.url, trace, None)
        errors = [r.error for r in records if r.error]
        if errors:
            raise RuntimeError(f"vLLM failed {len(errors)} requests: {errors[0]}")
        return [r.output_tokens for r in records]

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._dir.cleanup()


def system_runners(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, shape: Shape, args: argparse.Namespace
) -> dict[str, Callable[[Workload], list[int]]]:
    """Each system as workload -> tokens generated per request."""
    return {
        "peftserve": lambda w: run_peftserve(model, tokenizer, shape, w, args),
        "peftserve-sdpa": lambda w: run_peftserve(model, tokenizer, shape, w, args, attention="sdpa"),
        "hf-sequential": lambda w: run_hf_sequential(model, w),
        "hf-static": lambda w: run_hf_static(model, w, args.batch_size),
        "hf-cb": lambda w: run_hf_cb(model, w),
    }  # vllm: a VllmPeer, made in bench_shape (it saves the model)


def run_system(
    system: str, run: Callable[[Workload], list[int]], shape: Shape, work: Workload, args: argparse.Namespace
) -> Result:
    """Warm the system up on a tiny workload, then time it on the real one."""
    name = f"hf-static-{args.batch_size}" if system == "hf-static" else system
    result = Result(system=name, shape=shape.name, requests=len(work.prompts))
    try:
        run(Workload(work.prompts[:2], 4))
        generated, result.seconds = timed(args.device, lambda: run(work))
    except ImportError as exc:
        result.note = f"skipped: peftserve engine not available ({exc})"
        return result
    result.generated_tokens = sum(generated)
    result.useful_flops = useful_flops(shape, [len(p) for p in work.prompts], generated)
    expected = len(work.prompts) * work.max_new_tokens
    if result.generated_tokens != expected:
        result.note = f"generated {result.generated_tokens} tokens, expected {expected}"
    return result


def bench_shape(shape: Shape, args: argparse.Namespace) -> list[Result]:
    """Build the shape's model once, then run each system on the same workload."""
    start = time.perf_counter()
    model = build_model(shape, device=args.device, dtype=getattr(torch, args.dtype), seed=args.seed)
    tokenizer = bench_tokenizer()
    print(f"[{shape.name}] model built in {time.perf_counter() - start:.1f}s", flush=True)
    # Ids the tokenizer knows (and below the model vocab), past the specials; the speed does not care.
    id_range = (3, min(len(tokenizer), shape.vocab))
    prompts = make_prompts(args.requests, args.min_prompt, args.max_prompt, id_range, seed=args.seed)
    work = Workload(prompts, args.max_new_tokens)
    runners = system_runners(model, tokenizer, shape, args)
    peer = VllmPeer(model, tokenizer, shape, work.max_tokens, args) if "vllm" in args.systems else None
    if peer is not None:
        runners["vllm"] = peer
    results: dict[str, Result] = {}
    try:
        # The engine takes the model over (its attention function, later adapter layers): it goes last.
        for system in sorted(args.systems, key=lambda s: s.startswith("peftserve")):
            system_work = work
            if system == "hf-sequential" and args.sequential_limit:
                system_work = Workload(prompts[: args.sequential_limit], args.max_new_tokens)
            results[system] = run_system(system, runners[system], shape, system_work, args)
            r = results[system]
            print(f"[{shape.name}] {r.system}: {r.tokens_per_s or 0:.1f} tok/s {r.note}", flush=True)
    finally:
        if peer is not None:
            peer.close()
    return [results[s] for s in SYSTEMS if s in results]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; --quick shrinks the workload to a smoke run of well under two minutes on 2 cores."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=[*SHAPES, *FAMILY_SHAPES, "both"], default="both")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="static batch size of hf-static")
    parser.add_argument(
        "--sequential-limit",
        type=int,
        default=None,
        help="hf-sequential serves only the first N requests (each runs alone, so tok/s carries over)",
    )
    parser.add_argument("--max-batched-tokens", type=int, default=1024, help="peftserve tokens per step")
    parser.add_argument("--block-size", type=int, default=16, help="peftserve tokens per KV block")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(DEFAULT_SYSTEMS))
    add_vllm_arguments(parser, threads_default="its own")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="peftserve replays decode steps from CUDA graphs"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="bench-mid only, 8 requests of 16-64 + 16 tokens"
    )
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.max_new_tokens, args.min_prompt, args.max_prompt = 8, 16, 16, 64
        args.batch_size = min(args.batch_size, 4)
        if args.shape == "both":
            args.shape = "bench-mid"
    if not 0 < args.min_prompt <= args.max_prompt:
        parser.error("need 0 < --min-prompt <= --max-prompt")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = list(SHAPES.values()) if args.shape == "both" else [{**SHAPES, **FAMILY_SHAPES}[args.shape]]
    peak = matmul_rate(args.device, getattr(torch, args.dtype), seconds=1.0 if args.quick else 3.0)
    print(f"dense {args.dtype} matmul rate on {args.device}: {peak / 1e9:.1f} GFLOP/s", flush=True)
    all_results: list[Result] = []
    with torch.inference_mode():
        for shape in shapes:
            results = bench_shape(shape, args)
            all_results += results
            print(
                f"\n{shape.name}: {args.requests} requests, prompts {args.min_prompt}-{args.max_prompt}, "
                f"{args.max_new_tokens} new tokens, greedy, EOS ignored"
            )
            print(format_table(results, peak, baseline="peftserve") + "\n", flush=True)
    if args.json_out:
        write_json(
            args.json_out,
            {
                "benchmark": "bench_engine",
                "args": {k: v for k, v in vars(args).items() if k != "json_out"},
                "environment": environment(args.device),
                "matmul_flops_per_s": peak,
                "results": [result_dict(r, peak) for r in all_results],
            },
        )


if __name__ == "__main__":
    main()
