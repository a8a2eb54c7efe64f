"""Due times of spooled messages: a heap, plus a parking lot.

An index, not a queue of bodies: entries are small Jobs whose bodies live in
the spool (a fresh job may carry its body while the hot-body budget allows).
`next()` waits for the earliest due job without polling. Jobs that cannot go
anywhere (no eligible upstream) are parked and released together by
`unpark_all()` when an upstream recovers or a breaker's open period ends.
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

    @property
    def queue_id(self) -> str:
        return self.meta.queue_id


class Scheduler:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._parked: list[Job] = []
        self._wakeup = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Scheduler scheduled={len(self._heap)} parked={len(self._parked)}>"

    def __len__(self) -> int:
        return len(self._heap) + len(self._parked)

    @property
    def parked(self) -> int:
        return len(self._parked)

    def add(self, job: Job, due: float | None = None) -> None:
        when = self._clock.monotonic() if due is None else due
        heapq.heappush(self._heap, (when, next(self._seq), job))
        if self._heap[0][2] is job:
            self._wakeup.set()

    def park(self, job: Job) -> None:
        self._parked.append(job)

    def unpark_all(self) -> None:
        parked, self._parked = self._parked, []
        now = self._clock.monotonic()
        for job in parked:
            self.add(job, now)

    async def next(self) -> Job:
        """The earliest job whose due time has come; waits without spinning."""
        while True:
            self._wakeup.clear()
            if self._heap:
                delay = self._heap[0][0] - self._clock.monotonic()
                if delay <= 0:
                    return heapq.heappop(self._heap)[2]
                try:
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
            else:
                await self._wakeup.wait()
