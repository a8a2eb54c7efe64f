"""The session's single lazily re-armed idle timer fires at the last deadline, once."""

from __future__ import annotations

import asyncio

from smtpbalancer.frontend.server import _Session


async def test_idle_timer_fires_once_at_the_last_deadline() -> None:
    loop = asyncio.get_running_loop()
    session = _Session(handler=object(), frontend=None, loop=loop, timeout=0.2)  # type: ignore[arg-type]
    fired: list[float] = []
    session._timeout_cb = lambda: fired.append(loop.time())  # type: ignore[method-assign]
    start = loop.time()
    session._reset_timeout()
    for _ in range(3):  # commands keep arriving: the deadline moves, the timer does not
        await asyncio.sleep(0.1)
        session._reset_timeout()
    last = loop.time()
    await asyncio.sleep(0.45)
    assert len(fired) == 1
    assert fired[0] >= last + 0.2 - 0.01
    assert fired[0] > start + 0.4


async def test_a_sooner_deadline_rearms_the_timer() -> None:
    loop = asyncio.get_running_loop()
    session = _Session(handler=object(), frontend=None, loop=loop, timeout=0.05)  # type: ignore[arg-type]
    fired: list[float] = []
    session._timeout_cb = lambda: fired.append(loop.time())  # type: ignore[method-assign]
    session._reset_timeout(5.0)  # e.g. data_timeout
    start = loop.time()
    session._reset_timeout()  # back to the short idle timeout
    await asyncio.sleep(0.3)
    assert len(fired) == 1
    assert start + 0.04 <= fired[0] < start + 0.25
    assert session._timeout_handle is not None
