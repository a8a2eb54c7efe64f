"""Due times of spooled messages: a heap, plus a parking lot.

An index, not a queue of bodies: entries are small Jobs whose bodies live in
the spool (a fresh job may carry its body while the hot-body budget allows).
`next()` waits for the earliest due job without polling. Jobs that cannot go
anywhere (no eligible upstream) are parked and released together by
`unpark_all()` when an upstream recovers or a breaker's open period ends.

A job is in at most one place: re-adding it (an operator's retry) or
discarding it (hold, delete) makes its older heap entry stale, and stale
entries are skipped when they surface, so nothing is searched or re-heaped.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

from smtpbalancer.clock import Clock
from smtpbalancer.replies import Reply
from smtpbalancer.spool.record import MessageMeta, Progress


@dataclass(slots=True, eq=False)
class Job:
    meta: MessageMeta
    progress: Progress
    body: bytes | None = None  # hot copy; None means read it from the spool
    rounds: int = 0  # completed retry rounds (each tried every eligible upstream once)
    avoid: set[str] = field(default_factory=set)  # upstreams that deferred it this round
    last_reply: dict[str, Reply] = field(default_factory=dict)  # latest deferral per rcpt
    held: bool = False  # an operator held it: set aside when it comes due
    entry: int = -1  # sequence number of its live heap entry (-1: not in the heap)

    @property
    def queue_id(self) -> str:
        return self.meta.queue_id


class Scheduler:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._parked: dict[str, Job] = {}
        self._wakeup = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Scheduler heap_entries={len(self._heap)} parked={len(self._parked)}>"

    @property
    def parked(self) -> int:
        return len(self._parked)

    def add(self, job: Job, due: float | None = None) -> None:
        """Schedule (or reschedule) a job; any earlier entry of it becomes stale."""
        when = self._clock.monotonic() if due is None else due
        self._parked.pop(job.queue_id, None)
        job.entry = next(self._seq)
        heapq.heappush(self._heap, (when, job.entry, job))
        if self._heap[0][2] is job:
            self._wakeup.set()

    def park(self, job: Job) -> None:
        job.entry = -1
        self._parked[job.queue_id] = job

    def discard(self, job: Job) -> None:
        """Forget a waiting job (held or deleted by an operator)."""
        job.entry = -1
        self._parked.pop(job.queue_id, None)

    def unpark_all(self) -> None:
        parked, self._parked = self._parked, {}
        now = self._clock.monotonic()
        for job in parked.values():
            self.add(job, now)

    async def next(self) -> Job:
        """The earliest job whose due time has come; waits without spinning."""
        while True:
            self._wakeup.clear()
            if self._heap:
                delay = self._heap[0][0] - self._clock.monotonic()
                if delay <= 0:
                    _, entry, job = heapq.heappop(self._heap)
                    if entry != job.entry:
                        continue  # stale: rescheduled or discarded since
                    job.entry = -1
                    return job
                try:
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
            else:
                await self._wakeup.wait()
