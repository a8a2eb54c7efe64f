"""Line discipline and time bounds at the front end (frontend/guard.py, hardening.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.proxy import make_config
from support.raw import RawClient
from support.waiting import wait_until

from smtpbalancer.app import App


async def running(tmp_path: Path, upstream: tuple[str, int], **server: Any) -> App:
    cfg = make_config(tmp_path / "spool", [("relay", upstream, 1)], server=server)
    return App(cfg)


@pytest.fixture
async def app(tmp_path: Path, sinks) -> AsyncIterator[App]:
    relay = await sinks("relay")
    async with await running(tmp_path, relay.address, idle_timeout="5s") as started:
        started.relay = relay  # type: ignore[attr-defined]
        yield started


async def in_transaction(app: App) -> RawClient:
    client = await RawClient.open(app.smtp_address)
    assert (await client.command(b"EHLO client.test")).startswith("250")
    assert (await client.command(b"MAIL FROM:<a@sender.test>")).startswith("250")
    assert (await client.command(b"RCPT TO:<b@rcpt.test>")).startswith("250")
    return client


@pytest.mark.parametrize(
    "line",
    [b"NOOP\n", b"NOOP\rX\r\n", b"MAIL FROM:<a@b.test>\rRCPT TO:<c@d.test>\r\n", b"NO\x00OP\r\n"],
)
async def test_command_with_bare_cr_lf_or_nul_is_501_5_5_2(app: App, line: bytes) -> None:
    client = await RawClient.open(app.smtp_address)
    await client.send(b"EHLO client.test\r\n" + line + b"NOOP\r\n")
    assert (await client.reply()).startswith("250-")
    assert (await client.reply()).startswith("501 5.5.2 ")
    assert (await client.reply()).startswith("250 2.0.0")  # the session goes on
    await client.close()


async def test_command_line_limit_is_512_octets_with_crlf(app: App) -> None:
    client = await RawClient.open(app.smtp_address)
    fits = b"NOOP " + b"x" * (512 - 7)
    assert (await client.command(fits)).startswith("250 2.0.0")
    assert (await client.command(fits + b"x")).startswith("500 5.5.2 ")
    assert (await client.command(b"NOOP " + b"x" * 5000)).startswith("500 5.5.2 ")
    assert (await client.command(b"NOOP")).startswith("250 2.0.0")
    await client.close()


async def test_text_line_limit_is_1000_octets_and_nothing_is_spooled(app: App) -> None:
    client = await in_transaction(app)
    assert (await client.command(b"DATA")).startswith("354")
    await client.send(b"Subject: long\r\n\r\n" + b"x" * 999 + b"\r\n.\r\n")
    assert (await client.reply()).startswith("500 5.5.2 ")
    assert (await client.command(b"MAIL FROM:<a@sender.test>")).startswith("250")
    assert (await client.command(b"RCPT TO:<b@rcpt.test>")).startswith("250")
    assert (await client.command(b"DATA")).startswith("354")
    await client.send(b"Subject: fits\r\n\r\n" + b"x" * 998 + b"\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.0.0")
    await client.close()
    assert app.submitter.accepted == 1


async def test_too_many_unknown_commands_get_421_4_7_0_and_close(app: App) -> None:
    client = await RawClient.open(app.smtp_address)
    for _ in range(5):
        assert (await client.command(b"BOGUS")).startswith("500 5.5.2 ")
    assert (await client.command(b"BOGUS")).startswith("421 4.7.0 ")
    assert await client.until_eof() == b""
    await client.close()


async def test_nul_in_body_is_550_5_6_0_and_not_spooled(app: App) -> None:
    client = await in_transaction(app)
    assert (await client.command(b"DATA")).startswith("354")
    await client.send(b"Subject: nul\r\n\r\na\x00b\r\n.\r\n")
    assert (await client.reply()).startswith("550 5.6.0 ")
    await client.close()
    assert app.submitter.accepted == 0


async def test_bare_newlines_are_normalised_before_spooling(tmp_path: Path) -> None:
    # No relay listens: the message stays in the spool, which must hold what will be relayed.
    async with await running(tmp_path, ("127.0.0.1", 9)) as app:
        client = await in_transaction(app)
        assert (await client.command(b"DATA")).startswith("354")
        await client.send(b"Subject: lf\r\n\r\none\ntwo\rthree\n.\r\nfour\r\n.\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
        await client.close()
        [spooled] = (tmp_path / "spool" / "segments").glob("*.log")
        data = spooled.read_bytes()
    assert b"one\r\ntwo\r\nthree\r\n.\r\nfour\r\n" in data
    body = data[data.index(b"Subject: lf") :]
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")


async def test_odd_ehlo_name_is_served_and_sanitised_in_received(app: App) -> None:
    client = await RawClient.open(app.smtp_address)
    assert (await client.command(b"EHLO bad..name;x")).startswith("250")
    assert (await client.command(b"MAIL FROM:<a@sender.test>")).startswith("250")
    assert (await client.command(b"RCPT TO:<b@rcpt.test>")).startswith("250")
    assert (await client.command(b"DATA")).startswith("354")
    assert (await client.command(b"Subject: x\r\n\r\nx\r\n.")).startswith("250 2.0.0")
    await client.close()
    relay = app.relay  # type: ignore[attr-defined]
    await wait_until(lambda: relay.messages == 1)
    assert relay.received[0].data.startswith(b"Received: from unknown ([127.0.0.1])")


async def test_idle_client_gets_421_4_4_2(tmp_path: Path, sinks) -> None:
    relay = await sinks("relay")
    async with await running(tmp_path, relay.address, idle_timeout="500ms") as app:
        client = await RawClient.open(app.smtp_address)
        assert (await client.command(b"EHLO client.test")).startswith("250")
        await client.send(b"NO")  # a trickled command line does not reset the idle timer
        for _ in range(3):
            await asyncio.sleep(0.1)
            await client.send(b"O")
        assert (await client.reply(timeout=3)).startswith("421 4.4.2 ")
        assert await client.until_eof() == b""
        await client.close()


async def test_slow_loris_data_phase_is_cut_by_data_timeout(tmp_path: Path, sinks) -> None:
    relay = await sinks("relay")
    async with await running(
        tmp_path, relay.address, idle_timeout="5s", data_timeout="700ms"
    ) as app:
        client = await in_transaction(app)
        assert (await client.command(b"DATA")).startswith("354")
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = b""
        while not answer and loop.time() - started < 3:
            await client.send(b"S")  # one byte at a time, well inside the idle timeout
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(client.reader.readline(), 0.05)
        assert answer.startswith(b"421 4.4.2 ")
        assert loop.time() - started < 2
        await client.close()
        assert app.submitter.accepted == 0 and app.store.messages == 0


async def test_talking_before_the_greeting_is_554_5_5_0(tmp_path: Path, sinks) -> None:
    relay = await sinks("relay")
    async with await running(tmp_path, relay.address, greet_pause="300ms") as app:
        eager = await RawClient.open(app.smtp_address, greet=False)
        await eager.send(b"EHLO eager.test\r\n")
        assert (await eager.reply()).startswith("554 5.5.0 ")
        assert await eager.until_eof() == b""
        await eager.close()
        polite = await RawClient.open(app.smtp_address)  # waits for the 220
        assert (await polite.command(b"EHLO polite.test")).startswith("250")
        await polite.close()
