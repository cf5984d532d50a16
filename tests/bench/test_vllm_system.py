"""The vLLM peer's command line, environment and request translation, without vLLM installed."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from peftserve.bench import http_system
from peftserve.bench.cli import add_bench_arguments, config_from_args
from peftserve.bench.config import BenchConfig
from peftserve.bench.vllm_system import (
    VllmServer,
    VllmSpec,
    adapter_pairs,
    lora_rank_flag,
    vllm_argv,
    vllm_env,
)
from peftserve.bench.workload import TraceRequest

PYTHON = Path("/peers/vllm/bin/python")
MODEL = Path("/work/model")


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _spec(**changes) -> VllmSpec:
    adapters = adapter_pairs(
        ["main/a0000", "main/a0001", "main/a0002"], [Path(f"/store/a{i}") for i in range(3)]
    )
    return VllmSpec(python=PYTHON, model_dir=MODEL, adapters=adapters, **changes)


def test_argv_serves_the_model_and_every_adapter_under_peftserve_ids():
    argv = vllm_argv(_spec(dtype="bfloat16", max_loras=32, max_lora_rank=12), port=8123)

    assert argv[:3] == [str(PYTHON), "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(argv, "--model") == str(MODEL)
    assert _flag(argv, "--dtype") == "bfloat16"
    assert _flag(argv, "--port") == "8123"
    assert "--enable-lora" in argv
    assert _flag(argv, "--max-loras") == "3"  # no more slots than adapters
    assert _flag(argv, "--max-lora-rank") == "16"  # rounded up to a rank vLLM takes
    assert _flag(argv, "--max-cpu-loras") == "3"  # every adapter stays in the host cache
    start = argv.index("--lora-modules") + 1
    assert argv[start : start + 3] == ["main/a0000=/store/a0", "main/a0001=/store/a1", "main/a0002=/store/a2"]


def test_argv_without_adapters_turns_lora_off():
    argv = vllm_argv(VllmSpec(python=PYTHON, model_dir=MODEL), port=1)
    assert _flag(argv, "--dtype") == "float32"  # always explicit: vLLM would pick bf16 on AVX512-BF16
    assert not {"--enable-lora", "--max-loras", "--lora-modules"} & set(argv)


def test_env_drops_our_python_paths_and_sets_the_cpu_knobs():
    parent = {"PATH": "/bin", "PYTHONPATH": "server:client", "VIRTUAL_ENV": "/work/.venv", "HOME": "/root"}
    env = vllm_env(_spec(kv_cache_gib=2.2, threads=2), parent)
    assert env["PATH"] == "/bin" and env["HOME"] == "/root"
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["OMP_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in vllm_env(_spec(), parent)  # vLLM's own default
    assert "LD_PRELOAD" not in env


def test_env_puts_preloaded_libraries_first():
    spec = _spec(preload=(Path("/peer/lib/libiomp5.so"), Path("/usr/lib/libtcmalloc.so.4")))
    assert vllm_env(spec, {"LD_PRELOAD": "/x.so"})["LD_PRELOAD"] == (
        "/peer/lib/libiomp5.so:/usr/lib/libtcmalloc.so.4:/x.so"
    )
    assert vllm_env(spec, {})["LD_PRELOAD"] == "/peer/lib/libiomp5.so:/usr/lib/libtcmalloc.so.4"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dtype": "float16"}, "dtype"),
        ({"max_lora_rank": 1024}, "ranks up to"),
        ({"threads": 0}, "threads"),
        ({"adapters": (("a=b", Path("/x")),)}, "'='"),
        ({"adapters": (("a", Path("/x")), ("a", Path("/y")))}, "distinct"),
    ],
)
def test_spec_rejects_what_vllm_would_misread(changes, message):
    with pytest.raises(ValueError, match=message):
        VllmSpec(python=PYTHON, model_dir=MODEL, **changes)


def test_lora_rank_flag_rounds_up():
    assert [lora_rank_flag(r) for r in (1, 2, 8, 9, 64, 65)] == [1, 8, 8, 16, 64, 128]


def test_missing_peer_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make peer-vllm"):
        VllmServer(VllmSpec(python=tmp_path / "none", model_dir=MODEL))


def test_bench_flags_select_the_peer():
    import argparse

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(
        ["--systems", "peftserve", "vllm", "vllm-base", "--dtype", "bfloat16", "--vllm-python", "/p/python"]
        + ["--vllm-preload", "/p/lib/libiomp5.so"]
    )
    config = config_from_args(args)
    assert config.systems == ("peftserve", "vllm", "vllm-base")
    assert (config.dtype, config.vllm_python, config.vllm_preload) == (
        "bfloat16",
        "/p/python",
        ("/p/lib/libiomp5.so",),
    )
    assert "vllm" not in BenchConfig().systems  # opt-in: the default run needs no peer
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(dtype="float16")


class _FakeOpenAI(BaseHTTPRequestHandler):
    """The two routes the benchmark uses, answering like vLLM; every completion body is kept."""

    bodies: list[dict] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        models = [
            {"id": name, "object": "model", "created": 0, "owned_by": "vllm"} for name in ("base", "main/a1")
        ]
        self._send(200, json.dumps({"object": "list", "data": models}).encode(), "application/json")

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        n = body["max_tokens"]
        chunk = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"]}
        events = [{**chunk, "choices": [{"index": 0, "text": "x", "finish_reason": None}]} for _ in range(n)]
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": n}
        events.append({**chunk, "choices": [], "usage": usage})
        stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        self._send(200, stream.encode(), "text/event-stream")


@pytest.fixture
def fake_peer():
    _FakeOpenAI.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_trace_requests_reach_the_peer_as_streamed_greedy_completions(fake_peer):
    trace = [TraceRequest(0, 0.0, 1, (5, 6, 7), 4), TraceRequest(1, 0.0, 0, (9,), 2)]
    records = http_system.run_trace(fake_peer, trace, ["main/a0", "main/a1"])
    assert [(r.output_tokens, r.error) for r in records] == [(4, None), (2, None)]
    by_prompt = {tuple(b["prompt"]): b for b in _FakeOpenAI.bodies}
    first = by_prompt[(5, 6, 7)]
    assert first["model"] == "main/a1"  # the trace's adapter index, named by the id peftserve serves
    assert (first["max_tokens"], first["temperature"], first["ignore_eos"], first["stream"]) == (
        4,
        0,
        True,
        True,
    )
    assert first["stream_options"] == {"include_usage": True}
    assert by_prompt[(9,)]["model"] == "main/a0"


def test_base_trace_names_the_first_listed_model(fake_peer):
    records = http_system.run_trace(fake_peer, [TraceRequest(0, 0.0, 0, (5,), 1)], None)
    assert records[0].error is None
    assert _FakeOpenAI.bodies[0]["model"] == "base"
