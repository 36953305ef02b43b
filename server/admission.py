"""Admission control: a concurrency limit, bounded per-adapter queues behind it, SLO-aware
rejection, and fair share across adapters. Pure bookkeeping (asyncio only; no engine, no torch).

- At most ``max_concurrent`` requests run in the engine; up to ``max_queued`` more wait.
- A request is refused at once (``Overloaded``: HTTP 429 / gRPC RESOURCE_EXHAUSTED, with a
  retry-after) when the queue is full, or when the estimated wait plus the estimated service time
  would overrun its deadline — instead of being queued to go slow and miss it anyway.
- Waiting requests are granted by a virtual token counter per adapter (VTC, "Fairness in Serving
  Large Language Models", Sheng et al. 2024): each grant charges the adapter its request's token
  cost divided by the adapter's weight; the next grant goes to the waiting adapter with the
  smallest counter. An adapter that was idle is lifted to the smallest active counter when it
  queues again, so idling banks no credit. One hot adapter thus gets its share, not the server.
- Draining refuses new requests (``Draining``: 503 / UNAVAILABLE) while the admitted ones finish.

Estimates: the service time is an exponentially weighted mean of observed request durations;
with every slot busy one frees about every ``service_time / max_concurrent``, so a request with
``q`` requests granted before it waits about ``(q + 1) * service_time / max_concurrent``, where
``q`` counts what fair share puts ahead of it (its own adapter's queue, and from each other
adapter at most as many), not the whole queue. A full queue refuses a newcomer only if its
adapter already holds its share; otherwise the newest request of the longest queue gives up
its place (429) — so the hot adapter is the one shed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

BASE_MODEL_KEY = ""  # the queue of requests to the base model (no adapter)


class Overloaded(Exception):
    """Refused now; ``retry_after_s`` says when trying again makes sense."""

    def __init__(self, message: str, retry_after_s: float, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.reason = reason  # "queue_full" | "queue_wait" | "deadline"


class Draining(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass
class _Waiter:
    adapter: str
    cost: float
    granted: asyncio.Future
    enqueued_at: float


@dataclass
class Ticket:
    """One admitted request; hand it back to ``release`` exactly once."""

    adapter: str
    cost: float
    queue_wait_s: float
    released: bool = False


@dataclass
class AdmissionStats:
    running: int
    queued: int
    queued_per_adapter: dict[str, int] = field(default_factory=dict)
    service_time_s: float | None = None


class AdmissionController:
    def __init__(self, max_concurrent: int, max_queued: int, adapter_weights: dict[str, float] | None = None,
                 max_queue_wait_s: float | None = None, service_time_smoothing: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_concurrent < 1 or max_queued < 0:
            raise ValueError("need max_concurrent >= 1 and max_queued >= 0")
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        # The server's own bound on queueing (an SLO): refuse when the estimated wait exceeds it,
        # and give up a queued request that has waited this long.
        self.max_queue_wait_s = max_queue_wait_s
        self.adapter_weights = dict(adapter_weights or {})
        self._smoothing = service_time_smoothing
        self._clock = clock
        self.running = 0
        self._queues: dict[str, deque[_Waiter]] = {}
        self._num_queued = 0
        self._counters: dict[str, float] = {}  # virtual tokens served per adapter (weighted)
        self.service_time_s: float | None = None
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    # -- estimates -----------------------------------------------------------------------------
    def queued_ahead(self, adapter: str) -> int:
        """Queued requests that fair share would grant before a new one of ``adapter``: its own
        queue, and from every other adapter at most as many (round robin, which is what the
        virtual token counters amount to for requests of similar cost; an adapter that was not
        queued is lifted to the others' counter and wins the tie with its shorter queue)."""
        own = len(self._queues.get(adapter, ()))
        return own + sum(min(len(q), own) for a, q in self._queues.items() if a != adapter)

    def estimated_wait_s(self, adapter: str = BASE_MODEL_KEY) -> float:
        """Expected queueing delay for a request of ``adapter`` arriving now: with every slot
        busy a slot frees about every ``service_time / max_concurrent``; 0 while one is free."""
        if self.running < self.max_concurrent and self._num_queued == 0:
            return 0.0
        if self.service_time_s is None:
            return 0.0  # nothing observed yet: no basis to refuse on time
        return (self.queued_ahead(adapter) + 1) * self.service_time_s / self.max_concurrent

    def check(self, adapter: str, deadline: float | None) -> None:
        """Raise ``Draining`` or ``Overloaded`` if a request arriving now cannot be admitted.
        A full queue only refuses an adapter that holds at least its share of it (see
        ``_make_room``)."""
        if self.draining:
            raise Draining("the server is shutting down")
        if self.running < self.max_concurrent and self._num_queued == 0:
            return  # a slot is free: it starts at once (how long it runs depends on its own length)
        wait = self.estimated_wait_s(adapter)
        if self._num_queued >= self.max_queued and self._longest_other_queue(adapter) is None:
            raise Overloaded(f"server overloaded: {self.running} running and {self._num_queued} queued requests",
                             retry_after_s=max(1.0, wait), reason="queue_full")
        if self.max_queue_wait_s is not None and wait > self.max_queue_wait_s:
            raise Overloaded(f"server overloaded: estimated wait {wait:.2f} s exceeds the "
                             f"{self.max_queue_wait_s:g} s queueing limit",
                             retry_after_s=max(1.0, wait), reason="queue_wait")
        if deadline is not None:
            needed = wait + (self.service_time_s or 0.0)
            remaining = deadline - self._clock()
            if needed > remaining:
                raise Overloaded(
                    f"the request cannot finish within its deadline ({remaining:.2f} s left; estimated wait "
                    f"{wait:.2f} s + service {self.service_time_s or 0.0:.2f} s)",
                    retry_after_s=max(1.0, wait), reason="deadline")

    def _longest_other_queue(self, adapter: str) -> str | None:
        """The adapter whose queue is longest, if it holds more than ``adapter`` would with one
        more request (it then gives up a place when the queue is full); else None."""
        own = len(self._queues.get(adapter, ()))
        longest = max((a for a, q in self._queues.items() if a != adapter and q),
                      key=lambda a: len(self._queues[a]), default=None)
        if longest is not None and len(self._queues[longest]) > own + 1:
            return longest
        return None

    def _make_room(self, adapter: str) -> None:
        """Full queue: the newest waiter of the longest queue is refused to make room."""
        victim_adapter = self._longest_other_queue(adapter)
        if victim_adapter is None:
            return
        victim = self._queues[victim_adapter].pop()
        self._num_queued -= 1
        if not victim.granted.done():
            victim.granted.set_exception(Overloaded(
                "server overloaded: this adapter holds more than its share of the queue",
                retry_after_s=max(1.0, self.estimated_wait_s(victim_adapter)), reason="queue_full"))

    # -- admit / release -----------------------------------------------------------------------
    async def acquire(self, adapter: str, cost: float, deadline: float | None = None) -> Ticket:
        """Admit now, or queue fairly until a slot frees; raises Overloaded/Draining when refused
        (also when the deadline passes while queued)."""
        self.check(adapter, deadline)
        now = self._clock()
        if self.running < self.max_concurrent and self._num_queued == 0:
            return self._grant(adapter, cost, now, now)
        if self._num_queued >= self.max_queued:
            self._make_room(adapter)
        queue = self._queues.setdefault(adapter, deque())
        if not queue:
            self._lift(adapter)
        waiter = _Waiter(adapter, cost, asyncio.get_running_loop().create_future(), now)
        queue.append(waiter)
        self._num_queued += 1
        limits = [t for t in (None if deadline is None else deadline - now, self.max_queue_wait_s) if t is not None]
        timeout = max(0.0, min(limits)) if limits else None
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.granted), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter.granted.done() and not waiter.granted.cancelled():
                ticket = waiter.granted.result()  # granted just as we gave up: hand the slot back
                self.release(ticket, None)
            else:
                waiter.granted.cancel()
                self._remove(waiter)
            if isinstance(exc, asyncio.TimeoutError):
                raise Overloaded("the request's deadline or the queueing limit passed while it was queued",
                                 retry_after_s=max(1.0, self.estimated_wait_s(adapter)), reason="deadline") from None
            raise

    def release(self, ticket: Ticket, service_time_s: float | None) -> None:
        """The request finished (any outcome); ``service_time_s`` feeds the estimate when it ran."""
        if ticket.released:
            return
        ticket.released = True
        self.running -= 1
        if service_time_s is not None and service_time_s > 0:
            previous = self.service_time_s
            self.service_time_s = service_time_s if previous is None else (
                previous + self._smoothing * (service_time_s - previous))
        self._grant_next()
        self._set_idle_if_empty()

    def _grant(self, adapter: str, cost: float, enqueued_at: float, now: float) -> Ticket:
        self.running += 1
        self._idle.clear()
        weight = self.adapter_weights.get(adapter, 1.0)
        counter = self._counters.get(adapter)
        if counter is None:  # an adapter's first grant starts at the others' level
            counter = self._min_active_counter()
        self._counters[adapter] = counter + cost / weight
        return Ticket(adapter, cost, now - enqueued_at)

    def _grant_next(self) -> None:
        while self.running < self.max_concurrent and self._num_queued:
            # smallest counter first; on a tie the shorter queue (the less demanding adapter)
            adapter = min((a for a, q in self._queues.items() if q),
                          key=lambda a: (self._counters.get(a, 0.0), len(self._queues[a])))
            waiter = self._queues[adapter].popleft()
            self._num_queued -= 1
            if waiter.granted.cancelled():
                continue
            waiter.granted.set_result(self._grant(adapter, waiter.cost, waiter.enqueued_at, self._clock()))

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.adapter)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._num_queued -= 1
        self._set_idle_if_empty()

    def _set_idle_if_empty(self) -> None:
        if self.running == 0 and self._num_queued == 0:
            self._idle.set()

    def _min_active_counter(self) -> float:
        active = [self._counters.get(a, 0.0) for a, q in self._queues.items() if q]
        return min(active) if active else min(self._counters.values(), default=0.0)

    def _lift(self, adapter: str) -> None:
        """An adapter starting to queue again is lifted to the smallest active counter."""
        active = [self._counters[a] for a, q in self._queues.items() if q and a in self._counters]
        if active:
            self._counters[adapter] = max(self._counters.get(adapter, 0.0), min(active))

    # -- drain ---------------------------------------------------------------------------------
    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing runs or queues; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    @property
    def queued(self) -> int:
        """Requests waiting for admission."""
        return self._num_queued

    def stats(self) -> AdmissionStats:
        return AdmissionStats(self.running, self._num_queued,
                              {a: len(q) for a, q in self._queues.items() if q}, self.service_time_s)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
