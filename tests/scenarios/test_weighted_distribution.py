"""Upstream weights 1:2:5 are honoured over 1,000 messages, on reused connections."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib
from support.mail import make_message
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App

MESSAGES = 1000
CLIENTS = 8


async def _send_many(port: int, count: int) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=15)
    await client.connect()
    for _ in range(count):
        _, body = make_message(size=100)
        await client.sendmail("esp@sender.test", ["r@rcpt.test"], body)
    await client.quit()


async def test_weights_1_2_5_are_honoured_within_two_percent(tmp_path: Path, sinks) -> None:
    one, two, five = await sinks("one"), await sinks("two"), await sinks("five")
    cfg = make_config(
        tmp_path / "spool",
        [("one", one.address, 1), ("two", two.address, 2), ("five", five.address, 5)],
    )
    async with App(cfg) as app:
        port = app.smtp_address[1]
        await asyncio.gather(*(_send_many(port, MESSAGES // CLIENTS) for _ in range(CLIENTS)))
        await wait_until(lambda: one.messages + two.messages + five.messages == MESSAGES)
        await wait_until(lambda: app.store.messages == 0)

    for sink, weight in ((one, 1), (two, 2), (five, 5)):
        share = sink.messages / MESSAGES
        assert abs(share - weight / 8) <= 0.02, f"{sink.name}: {sink.messages} of {MESSAGES}"
    # Persistent upstream sessions: far fewer connections than messages.
    assert one.connections + two.connections + five.connections <= 40
