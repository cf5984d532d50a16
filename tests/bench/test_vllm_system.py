"""The vLLM peer's command line, environment and request translation, without vLLM installed."""

from __future__ import annotations

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
    prefix_cache_tokens,
    vllm_argv,
    vllm_env,
)
from peftserve.bench.workload import TraceRequest
from tests.helpers.fake_openai import FakeOpenAI

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


def test_argv_sets_prefix_caching_step_budget_and_block_only_when_asked():
    default = vllm_argv(_spec(), port=1)
    assert not {"--enable-prefix-caching", "--no-enable-prefix-caching", "--max-num-batched-tokens"} & set(
        default
    )
    assert "--block-size" not in default  # vLLM's own (128 on CPU)
    on = vllm_argv(_spec(prefix_caching=True, max_num_batched_tokens=512, block_size=32), port=1)
    assert "--enable-prefix-caching" in on and "--no-enable-prefix-caching" not in on
    assert (_flag(on, "--max-num-batched-tokens"), _flag(on, "--block-size")) == ("512", "32")
    off = vllm_argv(_spec(prefix_caching=False), port=1)
    assert "--no-enable-prefix-caching" in off and "--enable-prefix-caching" not in off


def test_prefix_cache_tokens_sum_vllm_counters_over_engines():
    metrics = "\n".join(
        [
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in queried tokens.",
            "# TYPE vllm:prefix_cache_queries_total counter",
            'vllm:prefix_cache_queries_total{engine="0",model_name="base"} 1200.0',
            'vllm:prefix_cache_queries_total{engine="1",model_name="base"} 300.0',
            'vllm:prefix_cache_hits_total{engine="0",model_name="base"} 896.0',
            'vllm:prefix_cache_hits_created{engine="0",model_name="base"} 1.7e+09',
            'vllm:external_prefix_cache_hits_total{engine="0",model_name="base"} 5.0',
        ]
    )
    assert prefix_cache_tokens(metrics) == (1500.0, 896.0)
    assert prefix_cache_tokens("") == (0.0, 0.0)


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
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"block_size": -16}, "block_size"),
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


def test_trace_requests_reach_the_peer_as_streamed_greedy_completions(fake_peer):
    trace = [TraceRequest(0, 0.0, 1, (5, 6, 7), 4), TraceRequest(1, 0.0, 0, (9,), 2)]
    records = http_system.run_trace(fake_peer, trace, ["main/a0", "main/a1"])
    assert [(r.output_tokens, r.error) for r in records] == [(4, None), (2, None)]
    by_prompt = {tuple(b["prompt"]): b for b in FakeOpenAI.bodies}
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
    assert FakeOpenAI.bodies[0]["model"] == "base"
