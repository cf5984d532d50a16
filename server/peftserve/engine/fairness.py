"""Fair share between tenants: per-tenant queues served by least service received, and token budgets.

Plain Python, no torch. The scheduler asks ``TenantQueues.next_candidate`` for the next sequence to
admit. Under the ``fair`` policy that is the queue head of the tenant with the smallest *virtual token
counter* (S-LoRA's VTC): every token the engine computes is charged to its tenant (prompt tokens at
PROMPT_TOKEN_COST, generated tokens at OUTPUT_TOKEN_COST), so a tenant that floods the queue is served
no more than the others while they have work, and cannot bank credit by going idle: a tenant that
becomes active again starts at the smallest counter among the active ones (all counters restart
when the engine is idle). Under ``fcfs`` it is the oldest waiting sequence, whoever sent it.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator

from peftserve.engine.sequence import Sequence

POLICIES = ("fair", "fcfs")
PROMPT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0
"""A generated token costs two prompt tokens: decode steps read the weights for few tokens each."""


class TenantQueues:
    """The waiting sequences, one FIFO queue per tenant, plus each tenant's running count and counter."""

    def __init__(self, policy: str = "fair") -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self._queues: dict[str, deque[Sequence]] = {}
        self._size = 0
        self.running: Counter[str] = Counter()
        """Running sequences per tenant (the scheduler reports starts and stops)."""
        self.counters: dict[str, float] = {}
        """Virtual token counter per tenant: the service it received, weighted by token kind."""

    # -- the queues ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Sequence]:
        for queue in self._queues.values():
            yield from queue

    def queued(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return len(queue) if queue else 0

    def push(self, seq: Sequence, front: bool = False) -> None:
        """Queue seq behind its tenant's others (front: ahead of them, for a preempted sequence)."""
        if not self._is_active(seq.tenant):
            self._activate(seq.tenant)
        queue = self._queues.setdefault(seq.tenant, deque())
        queue.appendleft(seq) if front else queue.append(seq)
        self._size += 1

    def remove(self, seq: Sequence) -> None:
        queue = self._queues[seq.tenant]
        queue.remove(seq)
        self._size -= 1
        if not queue:
            del self._queues[seq.tenant]

    # -- running and service --------------------------------------------------------------------

    def started(self, seq: Sequence) -> None:
        self.running[seq.tenant] += 1

    def stopped(self, seq: Sequence) -> None:
        self.running[seq.tenant] -= 1
        if self.running[seq.tenant] <= 0:
            del self.running[seq.tenant]

    def charge(self, tenant: str, num_tokens: int, decode: bool) -> None:
        """Account tokens computed for tenant this step: decode tokens, or a chunk of prompt."""
        cost = OUTPUT_TOKEN_COST if decode else PROMPT_TOKEN_COST
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost * num_tokens

    def _is_active(self, tenant: str) -> bool:
        return tenant in self._queues or tenant in self.running

    def _activate(self, tenant: str) -> None:
        active = [self.counters.get(t, 0.0) for t in {*self._queues, *self.running}]
        if not active:  # the engine was idle: nobody is owed anything
            self.counters.clear()
            self.counters[tenant] = 0.0
        else:  # no credit for the time away, no penalty beyond what it used
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), min(active))

    # -- order --------------------------------------------------------------------------------

    def priority(self, seq: Sequence) -> tuple[float, float]:
        """Sort key of prefill work: fair: (the tenant's counter, arrival); fcfs: (0, arrival)."""
        return (self.counters.get(seq.tenant, 0.0) if self.policy == "fair" else 0.0, seq.arrival)

    def goes_first(self, under_way: Sequence, waiting: Sequence) -> bool:
        """Whether a prompt under way takes its next chunk before a waiting sequence is admitted.

        fcfs, or both of one tenant: always (it was admitted first). fair: when its tenant has received
        less service than the waiting one's; on a tie the waiting one goes first (a tenant that just
        became active starts level with the least served one, and is owed its turn).
        """
        if self.policy == "fcfs" or under_way.tenant == waiting.tenant:
            return True
        return self.priority(under_way)[0] < self.priority(waiting)[0]

    def next_candidate(
        self, passed_over: set[Sequence], admissible: Callable[[Sequence], bool]
    ) -> Sequence | None:
        """The sequence to consider next for admission, or None when no tenant has one.

        Per tenant, the first queued sequence not in passed_over (sequences the scheduler skipped this
        step); tenants whose candidate is not admissible (e.g. at their running limit) are left out.
        """
        best: Sequence | None = None
        best_key: tuple[float, float] = (math.inf, math.inf)
        for queue in self._queues.values():
            seq = next((s for s in queue if s not in passed_over), None)
            if seq is None or not admissible(seq):
                continue
            key = self.priority(seq)
            if key < best_key:
                best, best_key = seq, key
        return best


class TokenBuckets:
    """Tokens per minute per tenant: a bucket of one minute's tokens, refilled continuously.

    A request takes its prompt plus max_new_tokens when it is queued and gets back what it did not
    generate when it ends. It is admitted when the bucket holds its cost, or when the bucket is full
    (so a request larger than a minute's budget still runs, and the bucket then goes below zero).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._levels: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at time)

    def _level(self, tenant: str, per_minute: int) -> float:
        tokens, at = self._levels.get(tenant, (float(per_minute), self._clock()))
        return min(float(per_minute), tokens + (self._clock() - at) * per_minute / 60.0)

    def take(self, tenant: str, cost: int, per_minute: int) -> float | None:
        """Take cost tokens and return None, or take nothing and return the seconds until they are there."""
        level = self._level(tenant, per_minute)
        if level < cost and level < per_minute:
            return (min(cost, per_minute) - level) * 60.0 / per_minute
        self._levels[tenant] = (level - cost, self._clock())
        return None

    def give_back(self, tenant: str, tokens: int, per_minute: int) -> None:
        """Return unused tokens (at most up to a full bucket)."""
        if tenant in self._levels:
            self._levels[tenant] = (self._level(tenant, per_minute) + tokens, self._clock())
            if self._levels[tenant][0] >= per_minute:
                del self._levels[tenant]  # full: the same as never seen
