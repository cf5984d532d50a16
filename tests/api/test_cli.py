"""The peftserve command's client side, run as a subprocess against a server started by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftserve.cli import build_parser

from .conftest import Served

ROOT = Path(__file__).resolve().parents[2]


def _peftserve(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "server"), str(ROOT / "client")])}
    return subprocess.run(
        [sys.executable, "-m", "peftserve.cli", *args], capture_output=True, text=True, env=env, timeout=30
    )


def test_generate_json(served: Served) -> None:
    run = _peftserve(
        "generate", "--address", served.address, "--prompt", "hello", "--max-new-tokens", "4", "--json"
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["text"] == "hell" and out["token_ids"] == list(b"hell")
    assert (out["finish_reason"], out["prompt_tokens"], out["completion_tokens"]) == ("length", 5, 4)


def test_generate_stream_prints_the_text(served: Served) -> None:
    run = _peftserve(
        "generate", "--address", served.address, "--prompt", "abc", "--max-new-tokens", "3", "--stream"
    )
    assert (run.returncode, run.stdout) == (0, "abc\n"), run.stderr


def test_failed_call_exits_1_with_the_status(served: Served) -> None:
    run = _peftserve("generate", "--address", served.address, "--prompt", "x", "--adapter", "nobody")
    assert run.returncode == 1
    assert run.stderr.startswith("error: NOT_FOUND: adapter 'default/nobody' not found"), run.stderr


def test_info_json_and_health(served: Served) -> None:
    info = _peftserve("info", "--address", served.address, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["model_id"] == "fake"
    health = _peftserve("health", "--address", served.address)
    assert (health.returncode, health.stdout.strip()) == (1, "NOT_SERVING")


def test_serve_flags_parse() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--port",
            "0",
            "--kv-cache-mb",
            "64",
            "--adapter",
            "a=/x",
            "--adapter",
            "b=/y",
            "--store",
            "/s",
        ]
    )
    assert (args.port, args.kv_cache_mb, args.max_running, args.store) == (0, 64.0, None, "/s")
    assert args.adapters == [("a", "/x"), ("b", "/y")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--adapter", "no-equals-sign"])


def test_every_engine_flag_reaches_the_engine_config() -> None:
    from dataclasses import fields

    from peftserve.cli import _ENGINE_FLAGS
    from peftserve.config import EngineConfig

    flagged = {name for _, name, _, _ in _ENGINE_FLAGS}
    set_elsewhere = {"adapters", "store"}  # --adapter ID=DIR (repeated) and --store
    assert flagged | set_elsewhere == {f.name for f in fields(EngineConfig)}
    args = build_parser().parse_args(
        ["serve", "--adapter-slots", "8", "--cpu-linear", "torch", "--host-cache-mb", "64"]
    )
    assert (args.adapter_slots, args.cpu_linear, args.host_cache_mb) == (8, "torch", 64.0)


def test_prefix_cache_flags() -> None:
    from peftserve.cli import _server_config
    from peftserve.errors import InvalidRequest

    args = build_parser().parse_args(
        ["serve", "--prefix-cache", "off", "--prefix-cache-tenant-share", "0.25"]
    )
    engine = _server_config(args).engine
    assert (engine.prefix_cache, engine.prefix_cache_tenant_share) == ("off", 0.25)
    assert _server_config(build_parser().parse_args(["serve"])).engine.prefix_cache == "on"
    for flags, message in (
        (["--prefix-cache", "maybe"], "prefix_cache must be on or off"),
        (["--prefix-cache-tenant-share", "0"], r"prefix_cache_tenant_share must be in \(0, 1\]"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            _server_config(build_parser().parse_args(["serve", *flags]))


def test_client_commands_do_not_import_torch() -> None:
    code = (
        "import sys; from peftserve.cli import main; "
        "rc = main(['info', '--address', '127.0.0.1:1', '--timeout', '1']); "
        "assert rc == 1, rc; bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "server"), str(ROOT / "client")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30)
    assert run.returncode == 0, run.stderr
    assert "error: UNAVAILABLE" in run.stderr
