"""ReplyReader's deadline: one watchdog timer per connection, each `replies` call still
gives up exactly at its own deadline, never earlier and never later."""

from __future__ import annotations

import asyncio
import time

import pytest

from smtpbalancer.upstream.wire import ReplyReader, WireError


class Transport:
    """Just enough of a transport for the reader: it only closes."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        pass


def reader() -> tuple[ReplyReader, Transport]:
    r, t = ReplyReader(), Transport()
    r.connection_made(t)  # type: ignore[arg-type]
    return r, t


async def test_a_call_waits_until_its_own_deadline_even_when_an_earlier_one_is_armed() -> None:
    r, _ = reader()
    first = asyncio.ensure_future(r.replies(1, 1.0))  # arms the watchdog at t+1.0
    await asyncio.sleep(0.5)
    r.data_received(b"250 one\r\n")
    assert await first == [(250, "one")]
    second = asyncio.ensure_future(r.replies(1, 1.0))  # deadline t+1.5: the t+1.0 timer re-arms
    await asyncio.sleep(0.8)  # past the first deadline, before the second
    assert not second.done()
    r.data_received(b"250 two\r\n")
    assert await second == [(250, "two")]
    assert not r.broken


async def test_a_shorter_timeout_after_a_longer_one_is_kept() -> None:
    r, t = reader()
    first = asyncio.ensure_future(r.replies(1, 30.0))  # the watchdog at t+30
    await asyncio.sleep(0)
    r.data_received(b"354 go ahead\r\n")
    await first
    started = time.monotonic()
    with pytest.raises(WireError, match=r"timed out after 0\.2s"):
        await asyncio.wait_for(r.replies(1, 0.2), 5)
    assert 0.15 <= time.monotonic() - started < 2.0
    assert r.broken and t.closed


async def test_no_timer_is_left_behind_once_the_wire_breaks() -> None:
    r, _ = reader()
    waiting = asyncio.ensure_future(r.replies(1, 30.0))
    await asyncio.sleep(0)
    r.connection_lost(None)
    with pytest.raises(WireError, match="connection lost"):
        await waiting
    assert r._timer is None
