"""The HTTP front's own cost: CPU of the server's event-loop thread per request and per streamed chunk.

No model: a stepping stand-in for LLMEngine (one token per running request per step, a step being a
sleep, its end optionally holding the GIL: --gil-ms) under the real AsyncEngine, the real FastAPI app
and uvicorn, in a child process. The `openai` client streams /v1/completions from this process, as
`peftserve bench`'s HTTP system does, with usage at the end. The child's threads are read from /proc
around each round, so the figure is the event loop's CPU (parsing, routing, translation, SSE writes,
output delivery), not the engine thread's.

Two shapes separate the costs: many one-token requests (per request) and long streams (per chunk, after
taking away the per-request cost). Rounds alternate; the median round is reported. On a shared machine
the figures move with the other load by a fifth or more: compare two versions in alternating runs.

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_http_front.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, fields

import openai

from peftserve.engine.request import FinishReason, RequestOutput

SERVER = """
import asyncio, sys
sys.path.insert(0, {here!r})
from bench_http_front import serve
asyncio.run(serve({step_s}, {gil_s}))
"""


class _Seq:
    def __init__(self, request) -> None:
        self.request_id = request.request_id
        self.adapter_keys = ()
        self.prompt_tokens = len(request.prompt_token_ids or ())
        self.max_new_tokens = request.sampling.max_new_tokens
        self.generated = 0


class SteppingEngine:
    """What AsyncEngine needs of an LLMEngine: a step lasts step_s, its last gil_s holding the GIL (as a
    real step's Python does), then every running request gets one token (id 65, text "A")."""

    adapters = None
    tokenizer = None

    def __init__(self, step_s: float, gil_s: float = 0.0) -> None:
        from tests.api.fake_engine import FakeEngine

        self.model_info = FakeEngine().model_info
        self.step_s = step_s
        self.gil_s = gil_s
        self.running: dict[str, _Seq] = {}

    def prepare(self, request) -> _Seq:
        return _Seq(request)

    def discard(self, seq: _Seq) -> None:
        pass

    def add_sequence(self, seq: _Seq) -> None:
        self.running[seq.request_id] = seq

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def abort(self, request_id: str) -> None:
        self.running.pop(request_id, None)

    def abort_all(self) -> list[RequestOutput]:
        self.running.clear()
        return []

    def step(self) -> list[RequestOutput]:
        time.sleep(max(0.0, self.step_s - self.gil_s))
        end = time.perf_counter() + self.gil_s
        while time.perf_counter() < end:
            pass
        outputs = []
        for seq in list(self.running.values()):
            seq.generated += 1
            done = seq.generated == seq.max_new_tokens
            if done:
                del self.running[seq.request_id]
            outputs.append(
                RequestOutput(
                    seq.request_id,
                    "A",
                    (65,),
                    None,
                    seq.prompt_tokens,
                    seq.generated,
                    FinishReason.LENGTH if done else None,
                )
            )
        return outputs


async def serve(step_s: float, gil_s: float = 0.0) -> None:
    """The HTTP app over AsyncEngine(SteppingEngine) on a free port; prints the port, runs until killed."""
    from peftserve.api.health import ServingHealth
    from peftserve.api.http import HttpServer, create_app
    from peftserve.auth import Authenticator
    from peftserve.engine.async_engine import AsyncEngine
    from peftserve.metrics import ServerMetrics

    engine = AsyncEngine(SteppingEngine(step_s, gil_s))
    health = ServingHealth()
    await health.mark_serving()
    app = create_app(engine, health=health, metrics=ServerMetrics(engine), auth=Authenticator())
    http = HttpServer(app, "127.0.0.1", 0)
    await http.start()
    print(http.port, flush=True)
    await asyncio.Event().wait()


def _thread_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the main thread, which runs the event loop; of all threads) of process pid.

    From schedstat's nanoseconds: stat's clock ticks (10 ms) are too coarse for a round.
    """
    main = total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            cpu = int(f.read().split()[0]) / 1e9
        total += cpu
        if int(tid) == pid:
            main = cpu
    return main, total


async def _streams(base_url: str, clients: int, tokens: int) -> int:
    """clients concurrent streamed completions of `tokens` tokens each; the content chunks received."""

    async def one(client: openai.AsyncOpenAI) -> int:
        stream = await client.completions.create(
            model="fake",
            prompt=[5, 6, 7, 8],
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = 0
        async for chunk in stream:
            chunks += bool(chunk.choices)
        return chunks

    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0) as client:
        return sum(await asyncio.gather(*(one(client) for _ in range(clients))))


@dataclass(frozen=True)
class Round:
    loop_s: float
    """CPU of the server's event-loop thread."""
    process_s: float
    requests: int
    chunks: int
    wall_s: float


def measure(pid: int, base_url: str, clients: int, tokens: int, waves: int) -> Round:
    """waves rounds of clients concurrent streams of `tokens` tokens, on the server process pid."""
    loop0, process0 = _thread_cpu(pid)
    start = time.perf_counter()
    chunks = sum(asyncio.run(_streams(base_url, clients, tokens)) for _ in range(waves))
    wall = time.perf_counter() - start
    loop1, process1 = _thread_cpu(pid)
    return Round(loop1 - loop0, process1 - process0, clients * waves, chunks, wall)


def per_request_and_chunk(short: Round, long: Round) -> tuple[float, float]:
    """Loop CPU seconds per request (from one-token streams) and per chunk after a request's first."""
    per_request = short.loop_s / short.requests
    return per_request, (long.loop_s - per_request * long.requests) / (long.chunks - long.requests)


def _median(rounds: list[Round]) -> Round:
    return Round(*(statistics.median(getattr(r, f.name) for r in rounds) for f in fields(Round)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per long stream")
    parser.add_argument("--waves", type=int, default=4, help="one-token rounds per measured short round")
    parser.add_argument("--step-ms", type=float, default=5.0, help="the stand-in engine's step time")
    parser.add_argument("--gil-ms", type=float, default=0.0, help="of each step, the part holding the GIL")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    code = SERVER.format(here=here, step_s=args.step_ms / 1e3, gil_s=args.gil_ms / 1e3)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        base_url = f"http://127.0.0.1:{child.stdout.readline().strip()}/v1"
        asyncio.run(_streams(base_url, args.clients, args.tokens))  # warm up
        shorts, longs = [], []
        for _ in range(args.rounds):
            shorts.append(measure(child.pid, base_url, args.clients, 1, args.waves))
            longs.append(measure(child.pid, base_url, args.clients, args.tokens, 1))
    finally:
        child.kill()
        child.wait()
    short, long = _median(shorts), _median(longs)
    per_request, per_chunk = per_request_and_chunk(short, long)
    print(f"{args.clients} clients, stand-in step {args.step_ms} ms, medians of {args.rounds} rounds:")
    for name, r in (("short", short), ("long", long)):
        print(
            f"  {name:5s}: {r.requests} requests, {r.chunks} chunks: loop CPU {r.loop_s * 1e3:.1f} ms,"
            f" process CPU {r.process_s * 1e3:.1f} ms, wall {r.wall_s * 1e3:.0f} ms"
        )
    print(f"  loop CPU per request {per_request * 1e3:.3f} ms, per further chunk {per_chunk * 1e6:.1f} us")


if __name__ == "__main__":
    main()
