"""The scheduler keeps each job in one place at most: retry, hold and delete rely on it."""

from __future__ import annotations

import asyncio

from smtpbalancer.clock import SystemClock
from smtpbalancer.delivery.scheduler import Job, Scheduler
from smtpbalancer.envelope import Envelope
from smtpbalancer.spool.record import MessageMeta, Progress


def job(queue_id: str) -> Job:
    meta = MessageMeta(queue_id, Envelope("a@b.test", ("c@d.test",)), 0.0, 10)
    return Job(meta, Progress())


async def drain(scheduler: Scheduler, timeout: float = 0.2) -> list[str]:
    got: list[str] = []
    try:
        while True:
            got.append((await asyncio.wait_for(scheduler.next(), timeout)).queue_id)
    except TimeoutError:
        return got


async def test_rescheduling_a_job_leaves_one_live_entry() -> None:
    clock = SystemClock()
    scheduler = Scheduler(clock)
    later, soon = job("LATER"), job("SOON")
    scheduler.add(later, clock.monotonic() + 3600)
    scheduler.add(soon)
    scheduler.add(later)  # an operator's retry: due now
    assert await drain(scheduler) == ["SOON", "LATER"]  # once each, the hour-late entry is stale


async def test_a_discarded_job_never_comes_due() -> None:
    clock = SystemClock()
    scheduler = Scheduler(clock)
    held, other = job("HELD"), job("OTHER")
    scheduler.add(held)
    scheduler.add(other)
    scheduler.discard(held)
    assert await drain(scheduler) == ["OTHER"]


async def test_a_parked_job_added_again_is_no_longer_parked() -> None:
    scheduler = Scheduler(SystemClock())
    parked = job("PARKED")
    scheduler.park(parked)
    scheduler.add(parked)  # retried by an operator while it waited for an upstream
    assert scheduler.parked == 0
    scheduler.unpark_all()
    assert await drain(scheduler) == ["PARKED"]
    scheduler.park(parked)
    scheduler.discard(parked)
    scheduler.unpark_all()
    assert await drain(scheduler) == []


async def test_due_hands_out_what_next_would_without_waiting() -> None:
    clock = SystemClock()
    scheduler = Scheduler(clock)
    first, second, later, stale = job("FIRST"), job("SECOND"), job("LATER"), job("STALE")
    scheduler.add(stale)
    scheduler.add(first)
    scheduler.add(second)
    scheduler.add(later, clock.monotonic() + 3600)
    scheduler.discard(stale)  # its entry is stale: skipped, as next skips it
    assert scheduler.due() is first and first.entry == -1
    assert scheduler.due() is second
    assert scheduler.due() is None  # only the hour-late job is left: next would wait
    parked = job("PARKED")
    scheduler.park(parked)
    scheduler.unpark_all()
    scheduler.add(job("NOW"))
    assert scheduler.due() is None  # parked jobs are being let out: next decides the order
    assert await drain(scheduler) == ["PARKED", "NOW"]
