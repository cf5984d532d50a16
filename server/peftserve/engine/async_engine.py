"""The asyncio front of the engine: one background thread steps the engine; callers await streams.

Requests and aborts cross into the engine thread through an inbox processed between steps, so a
cancelled request leaves the batch (and frees its KV blocks) before the next step runs. Outputs
cross back with ``loop.call_soon_threadsafe`` into one asyncio.Queue per request. A request whose
adapter is not in host memory awaits its load (on the manager's load threads) before it enters the
inbox, so the engine keeps stepping everyone else meanwhile. Adapter administration (``admin``)
runs its device changes on the engine thread through the same inbox (``run_on_engine``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from peftserve.adapters.admin import AdapterAdminService
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.protocol import EngineStats, ModelInfo
from peftserve.engine.request import GenerationRequest, RequestOutput
from peftserve.engine.sequence import Sequence
from peftserve.errors import EngineFailure, InvalidRequest, PeftServeError, Unavailable, quote
from peftserve.model.chat import render_chat
from peftserve.model.text import token_strings

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    """Implements EngineClient (engine/protocol.py) over an LLMEngine driven by its own thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._in_flight: set[str] = set()  # event-loop side
        self._accepting = True
        self._stopped = False
        self.admin: AdapterAdminService | None = None
        """The AdapterAdmin of the served adapters (engine/protocol.py), or None without adapters."""
        adapters = engine.adapters
        if adapters is not None:
            self.admin = AdapterAdminService(
                adapters.manager,
                engine.store,
                self.run_on_engine,
                keep_versions=engine.config.adapter_versions_kept,
            )
        self._thread = threading.Thread(target=self._run, name="peftserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def create(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model, warm it up and start the engine thread (blocking; seconds)."""
        engine = LLMEngine.create(config)
        engine.warmup()
        return cls(engine)

    # -- EngineClient -----------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        return self.engine.model_info

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return token_strings(self.engine.tokenizer, token_ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return render_chat(self.engine.tokenizer, messages)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def adapter_metrics(self):
        """The adapter tiers' prometheus collector (ServerMetrics registers it), or None."""
        adapters = self.engine.adapters
        return adapters.manager.metrics if adapters is not None else None

    async def run_on_engine(self, fn: Callable[[], T]) -> T:
        """Run fn on the engine thread between two steps and return its result (device changes)."""
        if self._stopped:
            raise Unavailable("the engine is stopped")
        future: Future = Future()
        self._submit(("call", fn, future))
        return await asyncio.wrap_future(future)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if not self._accepting:
            raise Unavailable("the server is shutting down; retry on another replica")
        if request.request_id in self._in_flight:
            raise InvalidRequest(
                f"request_id {quote(request.request_id)} is already in flight; use a unique id"
            )
        seq = self.engine.prepare(request)
        self._in_flight.add(request.request_id)
        try:
            await self._load_adapters(seq)
        except BaseException:
            self._in_flight.discard(request.request_id)
            self.engine.discard(seq)
            self._wakeup.set()  # device drops the release may have asked for
            raise
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self._submit(("add", seq, sink))
        finished = False
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._in_flight.discard(request.request_id)
            if not finished:
                self._submit(("abort", request.request_id))

    async def _load_adapters(self, seq: Sequence) -> None:
        """Wait (off the engine thread) until the sequence's adapter versions are in host memory."""
        if self.engine.adapters is not None and seq.adapter_keys:
            futures = self.engine.adapters.host_loads(seq)
            await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    async def drain(self, grace_s: float) -> None:
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._in_flight:
            log.warning("cancelling %d requests still running after %.1fs", len(self._in_flight), grace_s)
            self._submit(("abort_all",))
            while self._in_flight:
                await asyncio.sleep(0.01)

    def shutdown(self) -> None:
        """Stop the engine thread (after drain) and the adapter load threads."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)
        if self.engine.adapters is not None:
            self.engine.adapters.manager.close()

    # -- engine thread ----------------------------------------------------------------------

    def _submit(self, item: tuple) -> None:
        self._inbox.put(item)
        self._wakeup.set()

    def _process_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = item[0]
            if kind == "add":
                _, seq, sink = item
                self._add(seq, sink)
            elif kind == "abort":
                self._sinks.pop(item[1], None)
                self.engine.abort(item[1])
            elif kind == "abort_all":
                for out in self.engine.abort_all():
                    self._deliver(out)
            elif kind == "call":
                _, fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
        if self.engine.adapters is not None:
            self.engine.adapters.manager.apply_drops()

    def _add(self, seq: Sequence, sink: _Sink) -> None:
        try:
            self.engine.add_sequence(seq)
        except Exception as exc:
            self.engine.discard(seq)
            if not isinstance(exc, PeftServeError):
                log.exception("could not queue request %s", seq.request_id)
                exc = EngineFailure("the engine failed while queueing this request")
            sink.put(exc)
            return
        self._sinks[seq.request_id] = sink

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is not None:
            sink.put(out.error if out.error is not None else out)
            if out.finished:
                del self._sinks[out.request_id]

    def _run(self) -> None:
        while not self._stopped:
            self._process_inbox()
            if not self.engine.has_unfinished():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:
                log.exception("engine step failed; failing the requests in flight")
                self.engine.abort_all()
                for sink in self._sinks.values():
                    sink.put(EngineFailure("the engine failed while running this request"))
                self._sinks.clear()
                continue
            for out in outputs:
                self._deliver(out)
