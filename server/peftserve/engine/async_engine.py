"""The asyncio front of the engine: one background thread steps the engine; callers await streams.

Requests and aborts cross into the engine thread through an inbox processed between steps, so a
cancelled request leaves the batch (and frees its KV blocks) before the next step runs. Outputs cross
back with one ``loop.call_soon_threadsafe`` per event loop per step (each call wakes the loop), into one
_Outputs per request: a stream that lags behind takes its waiting increments merged into one, as vLLM's
RequestOutputCollector does, and so sends one message where it would have sent several. A request whose
adapter is not in host memory awaits its load (on the manager's load threads) before it enters the
inbox, so the engine keeps stepping everyone else meanwhile. Adapter administration (``admin``) runs
its device changes on the engine thread through the same inbox (``run_on_engine``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TypeVar

from peftserve.adapters.admin import AdapterAdminService
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.protocol import EngineStats, ModelInfo
from peftserve.engine.request import GenerationRequest, RequestOutput, merged
from peftserve.engine.sequence import Sequence
from peftserve.errors import EngineFailure, InvalidRequest, PeftServeError, Unavailable, quote
from peftserve.model.chat import render_chat
from peftserve.model.text import token_strings

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Outputs:
    """What the engine has produced for one request and its stream has not taken yet (event loop only)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._waiting: list[RequestOutput] = []
        self._error: BaseException | None = None
        self._wakeup: asyncio.Future[None] | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = item
        else:
            self._waiting.append(item)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def take(self) -> RequestOutput:
        """Every increment waiting, merged into one; the request's error once none is left."""
        while not self._waiting:
            if self._error is not None:
                raise self._error
            self._wakeup = self.loop.create_future()
            await self._wakeup
        waiting, self._waiting = self._waiting, []
        return merged(waiting)


_Delivery = list[tuple[_Outputs, RequestOutput | BaseException]]
"""Items for requests' _Outputs, handed from the engine thread to the event loops."""


def _put_all(delivery: _Delivery) -> None:
    for outputs, item in delivery:
        outputs.put(item)


def _hand_over(delivery: _Delivery) -> None:
    """Put each item into its _Outputs from the engine thread, with one thread-safe call per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, _Delivery] = {}
    for outputs, item in delivery:
        by_loop.setdefault(outputs.loop, []).append((outputs, item))
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


class AsyncEngine:
    """Implements EngineClient (engine/protocol.py) over an LLMEngine driven by its own thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._outputs: dict[str, _Outputs] = {}  # engine thread only
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
        outputs = _Outputs(asyncio.get_running_loop())
        self._submit(("add", seq, outputs))
        finished = False
        try:
            while True:
                try:
                    output = await outputs.take()
                except Exception:  # the request failed: nothing left to abort
                    finished = True
                    raise
                finished = output.finished
                yield output
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
        """Stop the engine thread (after drain), the runner's warm-up and the adapter load threads."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)
        self.engine.runner.close()
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
                _, seq, outputs = item
                self._add(seq, outputs)
            elif kind == "abort":
                self._outputs.pop(item[1], None)
                self.engine.abort(item[1])
            elif kind == "abort_all":
                self._deliver(self.engine.abort_all())
            elif kind == "call":
                _, fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
        if self.engine.adapters is not None:
            self.engine.adapters.manager.apply_drops()

    def _add(self, seq: Sequence, outputs: _Outputs) -> None:
        try:
            self.engine.add_sequence(seq)
        except Exception as exc:
            self.engine.discard(seq)
            if not isinstance(exc, PeftServeError):
                log.exception("could not queue request %s", seq.request_id)
                exc = EngineFailure("the engine failed while queueing this request")
            _hand_over([(outputs, exc)])
            return
        self._outputs[seq.request_id] = outputs

    def _deliver(self, step_outputs: list[RequestOutput]) -> None:
        delivery: _Delivery = []
        for out in step_outputs:
            outputs = self._outputs.get(out.request_id)
            if outputs is not None:
                delivery.append((outputs, out.error if out.error is not None else out))
                if out.finished:
                    del self._outputs[out.request_id]
        _hand_over(delivery)

    def _run(self) -> None:
        while not self._stopped:
            self._process_inbox()
            if not self.engine.has_unfinished():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                step_outputs = self.engine.step()
            except Exception:
                log.exception("engine step failed; failing the requests in flight")
                self.engine.abort_all()
                failure = EngineFailure("the engine failed while running this request")
                _hand_over([(outputs, failure) for outputs in self._outputs.values()])
                self._outputs.clear()
                continue
            self._deliver(step_outputs)
