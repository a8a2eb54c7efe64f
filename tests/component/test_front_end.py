"""The front end as an ESP sees it: extensions, reply codes, limits, relay policy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
from support.mail import connected_client, make_message
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App
from smtpbalancer.envelope import valid_queue_id


@pytest.fixture
async def app(tmp_path: Path, sinks) -> AsyncIterator[App]:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool",
        [("relay", relay.address, 1)],
        server={
            "max_recipients": 3,
            "max_message_size": "20KB",
            "max_connections": 3,
            "allow_networks": ["127.0.0.1/32"],
        },
    )
    async with App(cfg) as running:
        running.relay = relay  # type: ignore[attr-defined]
        yield running


async def connect(app: App, source: str = "127.0.0.1") -> aiosmtplib.SMTP:
    return await connected_client(app.smtp_address[1], source)


async def test_ehlo_advertises_what_esp_clients_look_for(app: App) -> None:
    client = await connect(app)
    assert client.esmtp_extensions["size"] == "20000"
    for ext in ("8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes"):
        assert client.supports_extension(ext), ext
    await client.quit()


async def test_data_reply_carries_the_queue_id_as_last_token(app: App) -> None:
    client = await connect(app)
    _, body = make_message()
    _, reply = await client.sendmail("a@sender.test", ["b@rcpt.test"], body)
    assert reply.startswith("2.0.0 Ok: queued as ")
    assert valid_queue_id(reply.rsplit(" ", 1)[1])
    await client.quit()


async def test_one_connection_carries_hundreds_of_transactions_with_rset_and_noop(
    app: App,
) -> None:
    client = await connect(app)
    for i in range(300):
        assert (await client.noop()).message.startswith("2.0.0")
        await client.mail("a@sender.test")
        if i % 3 == 0:
            assert (await client.rset()).code == 250
            continue
        await client.rcpt("b@rcpt.test")
        _, body = make_message(size=50)
        assert (await client.data(body)).code == 250
    await client.quit()
    await wait_until(lambda: app.relay.messages == 200)  # type: ignore[attr-defined]


async def test_client_outside_allow_networks_cannot_relay(app: App) -> None:
    client = await connect(app, source="127.0.0.2")
    await client.mail("a@sender.test")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await client.rcpt("victim@elsewhere.test")
    assert (refused.value.code, refused.value.message[:5]) == (554, "5.7.1")
    with pytest.raises(aiosmtplib.SMTPDataError) as no_rcpt:
        await client.data(b"Subject: spam\r\n\r\nspam\r\n")
    assert no_rcpt.value.code == 503
    await client.quit()
    assert app.store.messages == 0 and app.submitter.accepted == 0


async def test_recipients_past_the_limit_get_452_4_5_3(app: App) -> None:
    client = await connect(app)
    await client.mail("a@sender.test")
    for n in range(3):
        await client.rcpt(f"r{n}@rcpt.test")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await client.rcpt("r4@rcpt.test")
    assert (refused.value.code, refused.value.message[:5]) == (452, "4.5.3")
    await client.quit()


async def test_oversize_is_552_5_3_4_at_mail_with_size_and_after_data_without(app: App) -> None:
    client = await connect(app)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as at_mail:
        await client.mail("a@sender.test", options=["SIZE=50000"])
    assert (at_mail.value.code, at_mail.value.message[:5]) == (552, "5.3.4")
    await client.mail("a@sender.test")
    await client.rcpt("b@rcpt.test")
    _, body = make_message(size=30_000)
    with pytest.raises(aiosmtplib.SMTPDataError) as after_data:
        await client.data(body)
    assert (after_data.value.code, after_data.value.message[:5]) == (552, "5.3.4")
    await client.quit()
    assert app.submitter.accepted == 0


async def test_addresses_with_control_characters_are_refused(app: App) -> None:
    reader, writer = await asyncio.open_connection(*app.smtp_address)
    await reader.readline()
    writer.write(b"HELO x\r\nMAIL FROM:<a\x01b@sender.test>\r\nMAIL FROM:<a\rb@sender.test>\r\n")
    await reader.readline()
    assert (await reader.readline()).startswith(b"501 5.1.7")
    # A bare CR never reaches the address parser: the whole line is refused (hardening.py).
    assert (await reader.readline()).startswith(b"501 5.5.2")
    writer.close()


async def test_connections_over_the_limit_get_421_4_7_0(app: App) -> None:
    held = [await connect(app) for _ in range(3)]
    reader, writer = await asyncio.open_connection(*app.smtp_address)
    assert (await reader.readline()).startswith(b"421 4.7.0 Too many connections,")
    assert await reader.read() == b""
    writer.close()
    for client in held:
        await client.quit()


async def test_every_reply_has_an_enhanced_status_code(app: App) -> None:
    reader, writer = await asyncio.open_connection(*app.smtp_address)
    await reader.readline()
    writer.write(b"HELO x\r\nNOOP\r\nRCPT TO:<a@b>\r\nBOGUS\r\nRSET\r\nQUIT\r\n")
    lines = [(await reader.readline()).decode().rstrip() for _ in range(6)]
    writer.close()
    assert lines[0].startswith("250 ")  # HELO reply: exempt (RFC 2034)
    for line, prefix in zip(
        lines[1:], ("250 2.0.0", "503 5.5.1", "500 5.5.2", "250 2.0.0", "221 2.0.0"), strict=True
    ):
        assert line.startswith(prefix), line
