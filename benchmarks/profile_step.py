"""Where a decode step's time goes: share per part at bench-1b with 64 running requests.

The engine serves the serving benchmark's main trace (64 requests, prompts uniform in 8-256 tokens; with
--adapters N, spread over N rank-16 LoRA adapters on all 7 projections with its power-law popularity)
until every request is decoding, then times `--steps` decode steps, each split by part (exclusive
time: a Linear inside an adapter layer counts as a Linear, the attention inside the model as attention):

  linears            the base model's linear layers and the output head (any Linear type)
  attention + cache  the attention function registered for the model, the cache writes, the step's
                     attention metadata
  adapter deltas     the adapter layers minus their base layer (every form's products)
  sampling           the runner's sampling of the step's rows
  model, other ops   the rest of the model forward: embeddings, norms, RoPE, activations, residuals
  engine, Python     the rest of the step: scheduling, packing, outputs

The hooks are module types, the registered attention function, the cache object and the runner's step
methods, not the bodies of today's functions, so the same script profiles the runner after it changes;
what it hooked is printed with the table.

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/profile_step.py --dtype bfloat16 --adapters 100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AttentionInterface

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, Shape, bench_tokenizer, build_model  # noqa: E402

from peftserve.adapters import layer as adapter_layer  # noqa: E402
from peftserve.adapters.manager import AdapterManager  # noqa: E402
from peftserve.bench.adapters import write_lora  # noqa: E402
from peftserve.bench.config import WorkloadSpec  # noqa: E402
from peftserve.bench.shapes import PROJECTIONS  # noqa: E402
from peftserve.bench.workload import TraceRequest, make_trace  # noqa: E402
from peftserve.config import EngineConfig  # noqa: E402
from peftserve.engine.engine import LLMEngine  # noqa: E402
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams  # noqa: E402

PARTS = (
    "linears",
    "attention + cache",
    "adapter deltas",
    "sampling",
    "model, other ops",
    "engine, Python",
)
RUNNER_PARTS = {
    "_attention": "attention + cache",  # the step's attention metadata
    "_sample": "sampling",
}
"""ModelRunner methods timed when the runner has them (a missing one is reported, its time goes to Python)."""


class PartTimer:
    """Exclusive wall time per part: time inside a nested part is not counted in its parent."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []
        self._mark = 0.0
        self.enabled = False

    def enter(self, name: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._mark
        self._stack.append(name)
        self._mark = now

    def exit(self) -> None:
        if not self.enabled or not self._stack:
            return
        now = time.perf_counter()
        self.seconds[self._stack.pop()] += now - self._mark
        self._mark = now

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def timed(self, fn: Callable, name: str) -> Callable:
        """fn, its every call timed as part `name`."""

        def timed(*args, **kwargs):
            with self.part(name):
                return fn(*args, **kwargs)

        return timed

    def hook(self, module: torch.nn.Module, name: str) -> None:
        """Time the module's every call as part `name` (forward hooks: whatever its forward is)."""
        module.register_forward_pre_hook(lambda *_: self.enter(name))
        module.register_forward_hook(lambda *_: self.exit())


def is_linear(module: torch.nn.Module) -> bool:
    """A base linear layer in any of the runner's forms (nn.Linear, a packed subclass or replacement)."""
    if isinstance(module, adapter_layer.MultiAdapterLayer):
        return False
    return isinstance(module, torch.nn.Linear) or type(module).__name__.endswith("Linear")


def instrument(engine: LLMEngine, timer: PartTimer) -> list[str]:
    """Hook every part by what is stable across runner designs: module types, the attention function
    registered for the model, the cache object's update, the runner's step methods. Returns what was
    found, so a renamed seam shows in the output instead of silently moving time to "Python"."""
    runner = engine.runner
    model = runner.model
    counts: dict[str, int] = defaultdict(int)
    for module in model.modules():
        if isinstance(module, adapter_layer.MultiAdapterLayer):
            timer.hook(module, "adapter deltas")  # its base layer, nested, counts as a linear
            counts["adapter layers"] += 1
        elif is_linear(module):
            timer.hook(module, "linears")
            counts["linears"] += 1
    timer.hook(model, "model, other ops")
    found = [f"{n} {what}" for what, n in counts.items()]

    name = model.config._attn_implementation
    attention_fn = AttentionInterface().get(name)
    if attention_fn is not None:
        AttentionInterface.register(name, timer.timed(attention_fn, "attention + cache"))
        found.append(f"attention function {name!r}")
    cache = getattr(runner, "cache", None)
    if cache is not None and hasattr(cache, "update"):
        cache.update = timer.timed(cache.update, "attention + cache")  # on the instance only
        found.append(f"{type(cache).__name__}.update")
    for method, part in RUNNER_PARTS.items():
        if hasattr(runner, method):
            setattr(runner, method, timer.timed(getattr(runner, method), part))
            found.append(f"ModelRunner.{method}")
        else:
            found.append(f"(no ModelRunner.{method}: its time counts as {PARTS[-1]})")
    return found


def adapter_directories(directory: Path, count: int, shape: Shape) -> list[tuple[str, Path]]:
    """count random rank-16 LoRA adapters on all 7 projections, as `peftserve bench` writes them."""
    made = []
    for i in range(count):
        path = directory / f"a{i:04d}"
        write_lora(path, shape, 16, PROJECTIONS, seed=1000 + i)
        made.append((f"bench/a{i:04d}", path))
    return made


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's defaults, room for every request of the trace, warm before it serves; --cpu-linear
    and the warm-up only where they exist (the profile also runs on older mains)."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    extra = {"cpu_linear": args.cpu_linear} if args.cpu_linear and "cpu_linear" in fields else {}
    if "warm_up" in fields:
        extra["warm_up"] = "before"
    return EngineConfig(dtype=args.dtype, kv_cache_mb=2048, max_running=args.requests, store=None, **extra)


def add_trace(
    engine: LLMEngine,
    trace: list[TraceRequest],
    ids: list[str],
    tag: str = "",
    max_new_tokens: int | None = None,
) -> None:
    """Every request of the trace into the engine, on its adapter (none when `ids` is empty), EOS ignored;
    max_new_tokens: each request's (None: its output length); tag: a prefix keeping request ids unique."""
    for request in trace:
        engine.add_request(
            GenerationRequest(
                f"{tag}{request.index}",
                prompt_token_ids=list(request.prompt_ids),
                sampling=SamplingParams(max_new_tokens=max_new_tokens or request.output_len, ignore_eos=True),
                adapters=(AdapterRef(ids[request.adapter]),) if ids else (),
            )
        )


def run_to_decode(engine: LLMEngine, trace: list[TraceRequest], ids: list[str]) -> None:
    """Admit the trace (outputs long enough not to finish) and step until every request decodes.

    RuntimeError if a request cannot be admitted (it would wait for one to finish: 512 steps)."""
    add_trace(engine, trace, ids, max_new_tokens=512)
    scheduler = engine.scheduler
    while scheduler.waiting or any(s.is_prefilling for s in scheduler.running):
        waiting = len(scheduler.waiting)
        engine.step()
        if (
            waiting
            and len(scheduler.waiting) == waiting
            and not any(s.is_prefilling for s in scheduler.running)
        ):
            raise RuntimeError(f"{waiting} requests cannot be admitted: too few KV blocks or adapter slots")
    engine.step()  # one decode step untimed (first touch of the decode buffers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-1b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--adapters", type=int, default=0, help="adapters to pick from (0: base model)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpu-linear", default=None, help="the engine's cpu_linear, where it has one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    model = build_model(shape, "cpu", getattr(torch, args.dtype), seed=0)
    tokenizer = bench_tokenizer()
    spec = WorkloadSpec(requests=args.requests, num_adapters=max(args.adapters, 1), seed=args.seed)
    trace = make_trace(spec, (3, min(len(tokenizer), shape.vocab)))
    with tempfile.TemporaryDirectory(prefix="profile-step-") as tmp:
        manager = None
        ids: list[str] = []
        if args.adapters:
            # Slots for every adapter of the batch, so all requests run at once: the trace spreads 64
            # requests over 51 of 100 adapters, more than the server's default 32 slots.
            slots = max(32, len({r.adapter for r in trace}))
            manager = AdapterManager(model, slots, "cpu", getattr(torch, args.dtype))
            for adapter_id, path in adapter_directories(Path(tmp), args.adapters, shape):
                manager.register(adapter_id, path)
                ids.append(adapter_id)
        engine = LLMEngine.from_model(model, tokenizer, engine_config(args), adapters=manager)
        timer = PartTimer()
        hooked = instrument(engine, timer)
        run_to_decode(engine, trace, ids)
        running = len(engine.scheduler.running)
        step_s: list[float] = []
        timer.enabled = True
        for _ in range(args.steps):
            with timer.part("engine, Python"):
                start = time.perf_counter()
                engine.step()
                step_s.append(time.perf_counter() - start)
        timer.enabled = False
        distinct = len({s.adapter_keys for s in engine.scheduler.running} - {()})
    total = sum(timer.seconds.values())
    print(
        f"{args.shape} {args.dtype}, {running} running, adapters {args.adapters} ({distinct} distinct in the "
        f"batch), threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    )
    print("hooked: " + ", ".join(hooked))
    median = sorted(step_s)[len(step_s) // 2]
    print(f"decode step: median {1e3 * median:.1f} ms, best {1e3 * min(step_s):.1f} ms, {args.steps} steps")
    rows = {part: timer.seconds.get(part, 0.0) for part in PARTS}
    for part, seconds in rows.items():
        print(f"  {part:<20} {100 * seconds / total:5.1f}%  {1e3 * seconds / args.steps:7.1f} ms/step")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "running": running,
            "distinct_adapters": distinct,
            "threads": torch.get_num_threads(),
            "load": os.getloadavg(),
            "hooked": hooked,
            "step_ms": [1e3 * s for s in step_s],
            "ms_per_step": {p: 1e3 * s / args.steps for p, s in rows.items()},
            "share": {p: s / total for p, s in rows.items()},
        }
        args.json_out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
