"""A recovered backlog with every upstream down must not hold the event loop.

After a restart the dispatcher goes through the whole recovered queue; with every
relay refusing, the breakers open and each job parks at once, without ever waiting
for a delivery slot. Gone through in one go, that held the loop (and the SMTP front
end: its greeting came ~0.45 s late with 37k queued). The dispatcher lets the loop
turn every JOBS_PER_TURN jobs.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App
from smtpbalancer.clock import SystemClock
from smtpbalancer.delivery.dispatcher import JOBS_PER_TURN, Dispatcher
from smtpbalancer.envelope import Envelope
from smtpbalancer.spool.store import SpoolStore

QUEUED = 3000


def refused_address() -> tuple[str, int]:
    """A loopback port nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


async def fill(spool: Path, count: int) -> None:
    store = SpoolStore(spool, SystemClock())
    store.open()
    env = Envelope("esp@sender.test", ("r@rcpt.test",))
    try:
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    store.store(env, b"Subject: %d\r\n\r\nbody\r\n" % i)
                    for i in range(start, start + 500)
                )
            )
    finally:
        store.close()


async def test_parking_a_recovered_backlog_lets_the_loop_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "spool"
    await fill(spool, QUEUED)
    dispatched = 0
    real = Dispatcher._dispatch

    def counting(self: Dispatcher, job: object) -> float | None:
        nonlocal dispatched
        dispatched += 1
        return real(self, job)  # type: ignore[arg-type]

    monkeypatch.setattr(Dispatcher, "_dispatch", counting)
    per_turn: list[int] = []
    seen = 0

    def tick() -> None:  # runs once per loop turn: how many jobs went by since the last
        nonlocal seen
        per_turn.append(dispatched - seen)
        seen = dispatched
        if dispatched < QUEUED:
            loop.call_soon(tick)

    cfg = make_config(spool, [("down", refused_address(), 1)])
    async with App(cfg) as app:
        assert app.recovered == QUEUED
        loop = asyncio.get_running_loop()
        seen = dispatched  # jobs that went by while the app started: other turns
        loop.call_soon(tick)
        await wait_until(lambda: dispatched >= QUEUED, timeout=30)
    assert max(per_turn) <= 2 * JOBS_PER_TURN, f"{max(per_turn)} jobs in one loop turn"
