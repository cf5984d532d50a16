"""A real `peftserve serve` in a subprocess on free ports, its readiness, its Prometheus endpoint.

The benchmark talks to it like any user would: gRPC through the SDK, the OpenAI-compatible HTTP API
through the openai client, metrics over HTTP.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import peftserve
import peftserve_client

READY = re.compile(r"peftserve serving \S+ on (\S+):(\d+)")
METRICS = re.compile(r"metrics on (https?://\S+/metrics)")
HTTP_API = re.compile(r"HTTP API on (https?://\S+)/v1")
ADAPTER_COUNTER = re.compile(r"adapter.*(load|evict)")
"""Counter families counted as adapter loads/evictions, e.g. peftserve_adapter_loads_total."""


def source_env(*extra_paths: Path) -> dict[str, str]:
    """This environment, with the server's and the SDK's sources (and extra_paths) importable."""
    roots = [Path(m.__file__).resolve().parents[1] for m in (peftserve, peftserve_client)]
    existing = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths = dict.fromkeys([*map(str, roots), *map(str, extra_paths), *existing])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


class ServerProcess:
    """A server subprocess whose log (stderr) is read on a thread: kept in `log`, copied to log_path.

    `serve(...)` starts `python -m peftserve.cli serve` on free ports; the constructor runs any argv
    that logs like it (tests start servers around fake engines that way).
    """

    def __init__(
        self, argv: Sequence[str], log_path: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.proc = subprocess.Popen(
            list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env or source_env()
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.metrics_url: str | None = None
        self.http_url: str | None = None
        """Root of the HTTP API (http://host:port) when the server runs one (serve --http-port)."""
        self._reader = threading.Thread(target=self._read, name="server-log", daemon=True)
        self._reader.start()

    @classmethod
    def serve(cls, serve_args: Sequence[str], log_path: Path | None = None) -> ServerProcess:
        """`peftserve serve` on port 0 with metrics on port 0, plus serve_args."""
        argv = [sys.executable, "-m", "peftserve.cli", "serve", "--port", "0", "--metrics-port", "0"]
        return cls([*argv, *serve_args], log_path)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with open(self.log_path or os.devnull, "w") as copy:
            for line in self.proc.stderr:
                copy.write(line)
                self.log.append(line)
                self._lines.put(line)

    def tail(self, lines: int = 40) -> str:
        return "".join(self.log[-lines:])

    def wait_ready(self, timeout_s: float) -> str:
        """Block until the server logs that it serves; its gRPC address. RuntimeError with the log tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if m := METRICS.search(line):
                self.metrics_url = m.group(1)
            if m := HTTP_API.search(line):
                self.http_url = m.group(1)
            if m := READY.search(line):
                return f"{m.group(1)}:{m.group(2)}"
        self.stop()
        raise RuntimeError("the peftserve server did not become ready:\n" + self.tail())

    def adapter_counters(self) -> dict[str, float] | None:
        """Adapter load/eviction counters from /metrics, by family name; None when the server has none."""
        if self.metrics_url is None:
            return None
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        counters = {
            family.name: sum(s.value for s in family.samples if s.name.endswith("_total"))
            for family in text_string_to_metric_families(text)
            if family.type == "counter" and ADAPTER_COUNTER.search(family.name)
        }
        return counters or None

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (the server drains), then SIGKILL after grace_s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
