"""Parked jobs come out one at a time, per pool: a pool still stuck costs one dispatch."""

from __future__ import annotations

import asyncio

from smtpbalancer.clock import SystemClock
from smtpbalancer.delivery.scheduler import Job, Scheduler
from smtpbalancer.envelope import Envelope
from smtpbalancer.spool.record import MessageMeta


def job(queue_id: str, pool: str = "default") -> Job:
    return Job(MessageMeta(queue_id, Envelope("a@b.test", ("c@d.test",), pool=pool), 0.0, 10))


async def take(scheduler: Scheduler) -> str | None:
    try:
        return (await asyncio.wait_for(scheduler.next(), 0.05)).queue_id
    except TimeoutError:
        return None


async def test_a_pool_parked_again_stops_being_let_out() -> None:
    scheduler = Scheduler(SystemClock())
    a1, a2, a3, b1 = job("A1"), job("A2"), job("A3"), job("B1", pool="bulk")
    for j in (a1, a2, a3, b1):
        scheduler.park(j)
    assert scheduler.parked == 4
    scheduler.unpark_all()
    assert await take(scheduler) == "A1"  # pools released together: the first parked first
    scheduler.park(a1)  # still nowhere to go: the rest of pool default stays parked
    assert await take(scheduler) == "B1"  # another pool is not held up by it
    assert await take(scheduler) is None
    assert scheduler.parked == 3
    scheduler.unpark_all()  # the next opening: in order again, A1 first
    assert [await take(scheduler) for _ in range(3)] == ["A1", "A2", "A3"]
    assert scheduler.parked == 0


async def test_released_jobs_go_before_work_due_later() -> None:
    clock = SystemClock()
    scheduler = Scheduler(clock)
    old, fresh = job("OLD"), job("FRESH")
    scheduler.park(old)
    scheduler.unpark_all()
    scheduler.add(fresh)
    assert [await take(scheduler), await take(scheduler)] == ["OLD", "FRESH"]
