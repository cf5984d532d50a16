"""vLLM's CPU build as a peer: its OpenAI API server in its own virtualenv, on the same model and adapters.

`make peer-vllm` builds the virtualenv (.peers/vllm); this module only needs its interpreter. The peer
serves the benchmark's saved model directory with the pool's PEFT adapter directories as LoRA modules
under the ids peftserve serves them by, so `http_system.run_trace` sends it the identical requests
(streamed /v1/completions on the prompt's token ids, greedy, EOS ignored, `model` naming the adapter).

Plain Python (no torch): the command line and environment are pure functions, tested without vLLM.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from peftserve.bench.config import DTYPES

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank."""
_PARENT_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
"""Variables of this process that would make the peer import our packages instead of its own."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class VllmSpec:
    """One vLLM server: what it serves, and the few settings made equal to peftserve's (the rest: its own)."""

    python: Path
    """Interpreter of the peer virtualenv."""
    model_dir: Path
    """The Hugging Face model directory peftserve serves (weights and tokenizer)."""
    dtype: str = "float32"
    """Always passed: on CPUs with AVX512-BF16 vLLM would otherwise pick bf16 on its own."""
    adapters: tuple[tuple[str, Path], ...] = ()
    """(served id, PEFT directory) of every LoRA to register; empty: LoRA off (the base engine)."""
    max_lora_rank: int = 16
    """Largest adapter rank (rounded up to a rank vLLM accepts)."""
    max_loras: int = 32
    """Adapters in one batch: peftserve's adapter slots."""
    max_num_seqs: int = 64
    """Requests decoding at once: peftserve's max_running."""
    max_model_len: int = 528
    """Longest prompt plus completion (sizes vLLM's buffers; its default is the model's context)."""
    max_num_batched_tokens: int | None = None
    """Tokens in one step (its chunked prefill's budget); None: vLLM's default."""
    prefix_caching: bool | None = None
    """Automatic prefix caching on or off; None: vLLM's default (on)."""
    block_size: int | None = None
    """Tokens per KV block (what its prefix cache shares); None: vLLM's default (128 on CPU)."""
    kv_cache_gib: float = 4.0
    """VLLM_CPU_KVCACHE_SPACE, rounded up to whole GiB."""
    threads: int | None = None
    """OMP_NUM_THREADS of the engine; None: vLLM's default, which keeps one core for its front end."""
    served_name: str = "base"
    """Name of the base model in /v1/models (listed first, as peftserve's)."""
    preload: tuple[Path, ...] = ()
    """Libraries put first in LD_PRELOAD: vLLM's CPU guide asks for Intel OpenMP (the peer has
    lib/libiomp5.so) and tcmalloc, and warns without them; empty: as installed."""

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"vLLM dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _check(self.max_lora_rank > 0, f"max_lora_rank must be > 0, got {self.max_lora_rank}")
        _check(self.max_lora_rank <= LORA_RANKS[-1], f"vLLM takes LoRA ranks up to {LORA_RANKS[-1]}")
        _check(self.max_loras > 0 and self.max_num_seqs > 0, "max_loras and max_num_seqs must be > 0")
        _check(self.kv_cache_gib > 0, f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        for name in ("max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"{name} must be > 0, got {value}")
        _check(self.threads is None or self.threads > 0, f"threads must be > 0, got {self.threads}")
        names = [name for name, _ in self.adapters]
        _check(len(set(names)) == len(names), "adapter ids must be distinct")
        _check(not any("=" in name or " " in name for name in names), "adapter ids cannot hold '=' or ' '")

    @property
    def lora(self) -> bool:
        return bool(self.adapters)


def lora_rank_flag(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank`."""
    return next(r for r in LORA_RANKS if r >= rank)


def vllm_argv(spec: VllmSpec, port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of vLLM's OpenAI API server for the spec."""
    argv = [
        str(spec.python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(spec.model_dir),
        "--served-model-name", spec.served_name,
        "--dtype", spec.dtype,
        "--max-model-len", str(spec.max_model_len),
        "--max-num-seqs", str(spec.max_num_seqs),
        "--host", host,
        "--port", str(port),
        "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    if spec.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(spec.max_num_batched_tokens)]
    if spec.prefix_caching is not None:
        argv.append("--enable-prefix-caching" if spec.prefix_caching else "--no-enable-prefix-caching")
    if spec.block_size is not None:
        argv += ["--block-size", str(spec.block_size)]
    if spec.lora:
        argv += [
            "--enable-lora",
            "--max-loras", str(min(spec.max_loras, len(spec.adapters))),
            "--max-lora-rank", str(lora_rank_flag(spec.max_lora_rank)),
            # Every registered adapter fits the host cache, like peftserve's: no reload from disk mid-run.
            "--max-cpu-loras", str(len(spec.adapters)),
            "--lora-modules", *(f"{name}={directory}" for name, directory in spec.adapters),
        ]  # fmt: skip
    return argv


def vllm_env(spec: VllmSpec, parent: Mapping[str, str]) -> dict[str, str]:
    """The peer's environment: `parent` without what would point it at our packages, plus vLLM's CPU knobs."""
    env = {k: v for k, v in parent.items() if k not in _PARENT_ENV}
    env["VLLM_CPU_KVCACHE_SPACE"] = str(math.ceil(spec.kv_cache_gib))
    env["HF_HUB_OFFLINE"] = "1"  # the model and adapters are local directories
    env["VLLM_NO_USAGE_STATS"] = "1"
    if spec.threads is not None:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    if spec.preload:
        env["LD_PRELOAD"] = ":".join([*map(str, spec.preload), *filter(None, [parent.get("LD_PRELOAD")])])
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (vLLM takes no port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_python(python: Path) -> Path:
    """The peer interpreter, or FileNotFoundError saying how to build it."""
    if not python.is_file():
        raise FileNotFoundError(f"no vLLM peer at {python}: build it with `make peer-vllm`")
    return python


class VllmServer:
    """vLLM's API server in a subprocess: on a free port, ready when /health answers, stopped by SIGTERM.

    Its output (vLLM logs to stdout) goes to log_path, or nowhere.
    """

    def __init__(self, spec: VllmSpec, log_path: Path | None = None) -> None:
        check_python(spec.python)
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        """Root of the OpenAI API (http_system's base_url)."""
        self.log_path = log_path
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path or os.devnull, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                vllm_argv(spec, self.port),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=vllm_env(spec, os.environ),
                start_new_session=True,  # its engine processes stop with it (see stop)
            )

    def tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log kept)"
        return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])

    def wait_ready(self, timeout_s: float) -> str:
        """Block until /health answers 200; the API root. RuntimeError with the log tail otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return self.url
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError("the vLLM server did not become ready:\n" + self.tail())

    def prefix_cache_tokens(self) -> tuple[float, float]:
        """(queried, found) prompt tokens of its prefix cache so far, from /metrics."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            return prefix_cache_tokens(response.read().decode())

    def pids(self) -> list[int]:
        """The server and its descendants (its engine core, the engine's workers), for CPU accounting."""
        pids, i = [self.proc.pid], 0
        while i < len(pids):
            try:
                for task in Path(f"/proc/{pids[i]}/task").iterdir():
                    pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass  # gone meanwhile
            i += 1
        return pids

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to its process group (the API server and its engine), SIGKILL after grace_s."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace_s)
        except ProcessLookupError:
            return  # the group has already gone
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def prefix_cache_tokens(metrics: str) -> tuple[float, float]:
    """(queried, found) prompt tokens of vLLM's prefix cache in its Prometheus text, summed over engines."""
    totals = {"vllm:prefix_cache_queries_total": 0.0, "vllm:prefix_cache_hits_total": 0.0}
    for line in metrics.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["vllm:prefix_cache_queries_total"], totals["vllm:prefix_cache_hits_total"]


def adapter_pairs(ids: Sequence[str], directories: Sequence[Path]) -> tuple[tuple[str, Path], ...]:
    """(served id, PEFT directory) pairs for VllmSpec.adapters: the same ids peftserve serves."""
    _check(len(ids) == len(directories), "one directory per adapter id")
    return tuple(zip(ids, directories, strict=True))
