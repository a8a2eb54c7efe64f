"""Mail parked behind an open breaker goes out when the open period ends.

The timer that lets parked mail out at the end of an open period can fire a little
early (uvloop counts whole milliseconds), so the first job out may find the breaker
still open and park again, while the open period ends before the next timer is armed.
That timer must still be armed: nothing else would ever let the lot out (the relay
is healthy, so no health-check recovery is coming), and every job would stay queued.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from support.waiting import wait_until

from smtpbalancer.clock import SystemClock
from smtpbalancer.config import BreakerConfig, UpstreamConfig
from smtpbalancer.delivery.dispatcher import Dispatcher
from smtpbalancer.delivery.retry import RetryPolicy
from smtpbalancer.delivery.scheduler import Scheduler
from smtpbalancer.envelope import DEFAULT_POOL, Envelope
from smtpbalancer.replies import Signal
from smtpbalancer.spool.store import SpoolStore
from smtpbalancer.tasks import cancel_and_wait
from smtpbalancer.upstream.breaker import BreakerState
from smtpbalancer.upstream.registry import Pick, Registry
from smtpbalancer.upstream.selection import Choice


class ManualClock(SystemClock):
    """Monotonic time moves only when the test says so; wall time is real."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


async def test_open_period_ending_while_a_job_parks_still_lets_the_lot_out(
    tmp_path: Path, sinks
) -> None:
    sink = await sinks("relay")
    host, port = sink.address
    clock = ManualClock(1000.0)
    registry = Registry(
        [UpstreamConfig(name="relay", host=host, port=port, slow_start_s=0.0)],
        BreakerConfig(failure_threshold=1, open_for_s=30.0),
        clock,
        local_hostname="proxy.test",
        timeout_s=5.0,
        rng=random.Random(7),
    )
    relay = registry["relay"]
    pick = registry.choose(clock.now, frozenset())
    assert isinstance(pick, Pick)
    registry.record(pick, Signal.FAILURE, "connect: refused")
    opening = relay.breaker.retry_at()
    assert relay.breaker.state is BreakerState.OPEN and opening is not None

    choose = registry.choose

    def open_period_ends_meanwhile(
        now: float, avoid: frozenset[str], pool: str = DEFAULT_POOL
    ) -> Pick | Choice:
        choice = choose(now, avoid, pool)
        clock.now = max(clock.now, opening)  # while the choice is acted on, time moves on
        return choice

    registry.choose = open_period_ends_meanwhile  # type: ignore[method-assign]

    store = SpoolStore(tmp_path / "spool", clock)
    store.open()
    scheduler = Scheduler(clock)
    dispatcher = Dispatcher(
        store=store,
        registry=registry,
        scheduler=scheduler,
        policy=RetryPolicy(0.2, 1.0, 3600.0),
        clock=clock,
        hostname="proxy.test",
        concurrency=1,
    )
    body = b"Subject: parked\r\n\r\nbody\r\n"
    meta = await store.store(Envelope("esp@sender.test", ("r@rcpt.test",)), body)
    clock.now = opening - 0.0005  # the opening timer fired half a millisecond early
    dispatcher.enqueue(meta, body)
    run = asyncio.create_task(dispatcher.run())
    try:
        await wait_until(lambda: sink.messages == 1 and store.messages == 0, timeout=3)
        assert relay.breaker.state is BreakerState.CLOSED  # the probe went out and succeeded
        assert (dispatcher.attempts, scheduler.parked) == (1, 0)
    finally:
        await cancel_and_wait([run])
        await dispatcher.finish(1.0)
        await registry.close()
        store.close()
