"""Graceful stop: a transaction in flight finishes, new connections get 421 4.3.2."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib
from support.mail import make_message
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App


async def test_transaction_in_flight_finishes_while_new_connections_are_refused(
    tmp_path: Path, sinks
) -> None:
    relay = await sinks("relay")
    cfg = make_config(tmp_path / "spool", [("relay", relay.address, 1)])
    app = App(cfg)
    await app.start()
    port = app.smtp_address[1]
    busy = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5)
    await busy.connect()
    await busy.mail("esp@sender.test")
    await busy.rcpt("r@rcpt.test")

    stopping = asyncio.create_task(app.stop())
    await wait_until(lambda: "draining" in repr(app.frontend))

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"421 4.3.2 ")
    writer.close()

    _, body = make_message()
    reply = await busy.data(body)
    assert reply.code == 250, "the transaction that was in flight completes"
    await asyncio.wait_for(stopping, 10)
    busy.close()
    assert relay.messages == 1 or app.store.messages == 1, "delivered, or still spooled"


async def test_smtputf8_and_8bit_bodies_are_relayed_as_is(tmp_path: Path, sinks) -> None:
    relay = await sinks("relay")
    cfg = make_config(tmp_path / "spool", [("relay", relay.address, 1)])
    async with App(cfg) as app:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.smtp_address[1], start_tls=False)
        await client.connect()
        body = "Subject: café\r\n\r\nGrüße aus Köln\r\n".encode()
        await client.sendmail(
            "jörg@absender.test",
            ["zoë@empfänger.test"],
            body,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
        await client.quit()
        await wait_until(lambda: relay.messages == 1)
    got = relay.received[0]
    assert got.mail_from == "jörg@absender.test"
    assert got.rcpt_tos == ("zoë@empfänger.test",)
    assert got.data.endswith(body)
