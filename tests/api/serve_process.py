"""Run a peftserve server as a subprocess and wait for its ready log line."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"peftserve serving (\S+) on (\S+):(\d+)")
METRICS = re.compile(r"metrics on (http://\S+/metrics)")


def source_env(*extra_paths: Path) -> dict[str, str]:
    """The environment with the repo's server and client sources (and extra_paths) importable."""
    paths = [ROOT / "server", ROOT / "client", *extra_paths]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}


class ServeProcess:
    """A server subprocess whose stderr (the log) is read on a thread."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.metrics_url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self._lines.put(line)

    def wait_ready(self, timeout_s: float) -> str:
        """The gRPC address from the ready line; also picks up the metrics URL logged before it."""
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
            if m := READY.search(line):
                return f"{m.group(2)}:{m.group(3)}"
        raise AssertionError("server did not become ready:\n" + self.tail())

    def tail(self, lines: int = 40) -> str:
        return "".join(self.log[-lines:])

    def stop(self) -> None:
        """Kill the process if a test left it running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def python(*args: str) -> list[str]:
    """argv running this interpreter."""
    return [sys.executable, *args]
