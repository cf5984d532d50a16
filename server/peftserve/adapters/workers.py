"""Run a step's independent per-adapter products on all cores: one share per thread, one thread each.

A product of one adapter's rank-r matrices with a few rows is too small for torch's intra-op pool:
OpenMP's barrier costs more than the work, and far more when another process holds a core. So instead
of splitting each product across the threads, the CPU kernels split the *list* of products: the calling
thread and `n - 1` helper threads each run their share with one intra-op thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

T = TypeVar("T")


def split_by_cost(costs: Sequence[float], parts: int) -> list[range]:
    """Cut items 0..n-1, in order, into at most `parts` consecutive runs of about equal total cost.

    Consecutive runs keep each share's items in the kernel's order (groups sorted by slot); a run never
    is empty, so fewer items than parts give fewer runs.
    """
    n = len(costs)
    total = float(sum(costs))
    cuts = [0]
    acc = 0.0
    for i, cost in enumerate(costs[:-1]):  # never after the last item: no empty run
        acc += cost
        # cut before the next item when its middle lies past the next share's boundary
        if len(cuts) < parts and acc + costs[i + 1] / 2 >= total * len(cuts) / parts:
            cuts.append(i + 1)
    cuts.append(n)
    return [range(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the block with one intra-op thread on the calling thread (OpenMP's setting is per thread)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Workers:
    """The caller plus `size - 1` helper threads, each running torch ops with one intra-op thread."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pool: ThreadPoolExecutor | None = None
        if size > 1:
            self._pool = ThreadPoolExecutor(size - 1, thread_name_prefix="adapter-delta")
            # Start every helper now, each setting its own thread count, so that no helper changes its
            # setting later while the caller runs torch ops. torch.set_num_threads also sets the count
            # that threads started later take; once every helper has taken its own, the caller's count
            # is set back for them.
            before = torch.get_num_threads()
            started = threading.Barrier(size)
            for _ in range(size - 1):
                self._pool.submit(_start_helper, started)
            started.wait()  # the helpers' torch ops no longer read the process's count
            torch.set_num_threads(before)

    def run(self, fn: Callable[[T], None], shares: Sequence[T]) -> None:
        """fn(share) for every share, concurrently: the last share on the calling thread."""
        if not shares:
            return
        if self._pool is None or len(shares) == 1:
            with one_intra_op_thread():
                for share in shares:
                    fn(share)
            return
        # Grad and inference mode are per thread: the helpers take the caller's.
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        futures: list[Future] = [self._pool.submit(_in_modes, modes, fn, share) for share in shares[:-1]]
        with one_intra_op_thread():  # torch's thread count is not only the caller's: kept at 1 until all end
            try:
                fn(shares[-1])
            finally:
                wait(futures)  # every share done before the caller reads y or raises
        for future in futures:
            future.result()  # a helper's error

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _in_modes(modes: tuple[bool, bool], fn: Callable[[T], None], share: T) -> None:
    grad, inference = modes
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        fn(share)


def _start_helper(started: threading.Barrier) -> None:
    """One intra-op thread for this helper for good: torch.set_num_threads in a thread keeps that thread's
    count, whatever the process's count is set to later (tests/adapters/test_workers.py)."""
    torch.set_num_threads(1)
    started.wait()


_lock = threading.Lock()
_workers: dict[int, Workers] = {}


def workers(size: int | None = None) -> Workers:
    """The process's workers of `size` threads (default: torch's intra-op thread count), made once."""
    size = size or torch.get_num_threads()
    with _lock:
        found = _workers.get(size)
        if found is None:
            found = _workers[size] = Workers(size)
        return found
