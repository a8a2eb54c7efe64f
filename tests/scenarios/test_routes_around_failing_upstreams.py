"""A dead upstream, or one that answers 451 to everything, costs nothing but a retry."""

from __future__ import annotations

import socket
from pathlib import Path

from support.mail import make_message, send_mail
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App
from smtpbalancer.upstream.breaker import BreakerState


def dead_address() -> tuple[str, int]:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return ("127.0.0.1", s.getsockname()[1])


async def test_dead_upstream_is_routed_around(tmp_path: Path, sinks) -> None:
    alive = await sinks("alive")
    cfg = make_config(
        tmp_path / "spool", [("dead", dead_address(), 5), ("alive", alive.address, 1)]
    )
    async with App(cfg) as app:
        for _ in range(20):
            _, body = make_message()
            errors, _ = await send_mail(app.smtp_address[1], body)
            assert errors == {}
        await wait_until(lambda: alive.messages == 20)
        await wait_until(lambda: app.store.messages == 0)
        assert app.registry["dead"].breaker.state is not BreakerState.CLOSED
        # The breaker stopped the proxy from trying the dead relay for every message.
        assert app.dispatcher.attempts < 20 + 10


async def test_upstream_that_451s_everything_loses_its_share_to_the_others(
    tmp_path: Path, sinks
) -> None:
    grumpy = await sinks("grumpy", rcpt_rule=lambda rcpt: "451 4.3.0 Try again later")
    healthy = await sinks("healthy")
    cfg = make_config(
        tmp_path / "spool", [("grumpy", grumpy.address, 1), ("healthy", healthy.address, 1)]
    )
    async with App(cfg) as app:
        ids = set()
        for _ in range(30):
            msg_id, body = make_message()
            ids.add(msg_id)
            await send_mail(app.smtp_address[1], body)
        await wait_until(lambda: healthy.messages == 30)
        await wait_until(lambda: app.store.messages == 0)
    assert grumpy.messages == 0
    assert {
        m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode() for m in healthy.received
    } == ids
    assert app.dispatcher.bounces == 0


async def test_all_upstreams_down_mail_is_spooled_then_delivered_when_they_return(
    tmp_path: Path, sinks
) -> None:
    addr_a, addr_b = dead_address(), dead_address()
    cfg = make_config(tmp_path / "spool", [("a", addr_a, 1), ("b", addr_b, 1)])
    async with App(cfg) as app:
        for _ in range(5):
            _, body = make_message()
            errors, reply = await send_mail(app.smtp_address[1], body)
            assert errors == {} and "queued as" in reply
        await wait_until(lambda: app.dispatcher.attempts >= 4)
        assert app.store.messages == 5
        sink_a = await sinks("a")
        await sink_a.stop()
        await sink_a.start(*addr_a)
        sink_b = await sinks("b")
        await sink_b.stop()
        await sink_b.start(*addr_b)
        await wait_until(lambda: sink_a.messages + sink_b.messages == 5, timeout=15)
        await wait_until(lambda: app.store.messages == 0)
    assert app.dispatcher.bounces == 0
