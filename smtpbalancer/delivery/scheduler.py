"""Due times of spooled messages: a heap, plus a parking lot.

An index, not a queue of bodies: entries are small Jobs whose bodies and envelopes
live in the spool (a fresh job may carry both while the hot-body budget allows).
A waiting job holds only what deciding where it goes needs: its id, arrival time,
pool and settled recipients; 100k of them are a few tens of MB.
`next()` waits for the earliest due job without polling. Jobs that cannot go
anywhere (no eligible upstream) are parked, per pool, and let out by
`unpark_all()` when an upstream recovers or a breaker's open period ends: one
at a time, in order, ahead of anything due later, and a pool whose next job is
parked again stays parked. So a queue of 100k waiting out an outage costs one
dispatch per opening, not 100k.

A job is in at most one place: re-adding it (an operator's retry) or
discarding it (hold, delete) makes its older heap entry stale, and stale
entries are skipped when they surface, so nothing is searched or re-heaped.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from typing import Final

from smtpbalancer.clock import Clock
from smtpbalancer.replies import Reply
from smtpbalancer.spool.record import NO_PROGRESS, MessageMeta, Progress

NO_AVOID: Final[frozenset[str]] = frozenset()


class Job:
    """One spooled message as delivery sees it. Plain slots, shared empty defaults: one
    exists per queued message."""

    __slots__ = (
        "avoid",
        "body",
        "entry",
        "held",
        "last_reply",
        "meta",
        "pool",
        "progress",
        "queue_id",
        "received_wall",
        "rounds",
    )

    def __init__(
        self,
        meta: MessageMeta,
        progress: Progress = NO_PROGRESS,
        body: bytes | None = None,
        *,
        held: bool = False,
    ) -> None:
        self.queue_id = meta.queue_id
        self.received_wall = meta.received_wall
        self.pool = meta.envelope.pool
        self.meta: MessageMeta | None = meta  # None while cold: read back with the body
        self.progress = progress
        self.body = body  # hot copy; None means read it from the spool
        self.rounds = 0  # completed retry rounds (each tried every eligible upstream once)
        self.avoid = NO_AVOID  # upstreams that deferred it this round
        self.last_reply: dict[str, Reply] | None = None  # latest deferral per rcpt
        self.held = held  # an operator held it: set aside when it comes due
        self.entry = -1  # sequence number of its live heap entry (-1: not in the heap)

    def __repr__(self) -> str:
        return (
            f"<Job {self.queue_id} rounds={self.rounds} held={self.held}"
            f" hot={self.body is not None} entry={self.entry}>"
        )


PARKED: Final = -2  # Job.entry of a parked job


class Scheduler:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        # Parked jobs per pool, oldest first. An entry whose job is no longer PARKED is
        # stale (added or discarded since) and skipped when it surfaces.
        self._lots: dict[str, deque[Job]] = {}
        self._released: dict[str, float] = {}  # pools being let out, and since when
        self._parked = 0
        self._wakeup = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<Scheduler heap_entries={len(self._heap)} parked={self._parked}"
            f" releasing={len(self._released)}>"
        )

    @property
    def parked(self) -> int:
        return self._parked

    def add(self, job: Job, due: float | None = None) -> None:
        """Schedule (or reschedule) a job; any earlier entry of it becomes stale."""
        when = self._clock.monotonic() if due is None else due
        if job.entry == PARKED:
            self._parked -= 1
        job.entry = next(self._seq)
        heapq.heappush(self._heap, (when, job.entry, job))
        if self._heap[0][2] is job:
            self._wakeup.set()

    def park(self, job: Job) -> None:
        """Set a job aside until `unpark_all`. Parking one while its pool is being let
        out means that pool still has nowhere to go: the rest of its lot stays parked."""
        if job.entry == PARKED:
            return
        job.entry = PARKED
        self._parked += 1
        lot = self._lots.get(job.pool)
        if lot is None:
            lot = self._lots[job.pool] = deque()
        if self._released.pop(job.pool, None) is not None:
            lot.appendleft(job)  # it was (or came before) the next one out
        else:
            lot.append(job)

    def discard(self, job: Job) -> None:
        """Forget a waiting job (held or deleted by an operator)."""
        if job.entry == PARKED:
            self._parked -= 1
        job.entry = -1

    def unpark_all(self) -> None:
        """Let every parked job out, in order, as if due now. They come out one at a time,
        so a pool that is still stuck costs one dispatch, not one per parked job."""
        now = self._clock.monotonic()
        for pool in self._lots:
            self._released.setdefault(pool, now)
        self._wakeup.set()

    def due(self) -> Job | None:
        """What `next` would return at once, without awaiting it; None when `next` would
        wait, or has parked jobs to let out (then await `next`)."""
        if self._released:
            return None
        heap = self._heap
        if not heap:
            return None
        now = self._clock.monotonic()
        while heap and heap[0][0] <= now:
            _, entry, job = heapq.heappop(heap)
            if entry == job.entry:  # else stale: rescheduled or discarded since
                job.entry = -1
                return job
        return None

    async def next(self) -> Job:
        """The earliest job whose due time has come; waits without spinning."""
        while True:
            self._wakeup.clear()
            if self._released:
                pool, since = min(self._released.items(), key=lambda item: item[1])
                if not self._heap or since < self._heap[0][0]:
                    job = self._unpark_one(pool)
                    if job is not None:
                        return job
                    continue
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

    def _unpark_one(self, pool: str) -> Job | None:
        lot = self._lots[pool]
        while lot:
            job = lot.popleft()
            if job.entry == PARKED:
                job.entry = -1
                self._parked -= 1
                return job
        del self._lots[pool], self._released[pool]
        return None
