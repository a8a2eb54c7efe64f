"""The DATA body as the front end reads it: in one piece, with SMTP's framing rules intact.

Dots doubled by the client come off, the end is exactly CRLF "." CRLF (the DATA line's
own CRLF counts, so a one-line body ends at the next "." line), what a client
pipelines after the end is the next command, an oversized body is read to its end and
refused with 552 (the session goes on), and an overlong line is refused with 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.proxy import make_config
from support.raw import RawClient
from support.waiting import wait_until

from smtpbalancer.app import App
from smtpbalancer.frontend.fast_lane import FastLane


@pytest.fixture(params=["fast lane", "session task"], autouse=True)
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs twice: bodies read by the fast lane, and by the session's task."""
    monkeypatch.setattr(FastLane, "enabled", request.param == "fast lane")


@pytest.fixture
async def app(tmp_path: Path, sinks) -> AsyncIterator[App]:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool", [("relay", relay.address, 1)], server={"max_message_size": "20KB"}
    )
    async with App(cfg) as started:
        started.relay = relay  # type: ignore[attr-defined]
        yield started


async def transaction(client: RawClient) -> None:
    assert (await client.command(b"MAIL FROM:<a@sender.test>")).startswith("250")
    assert (await client.command(b"RCPT TO:<b@rcpt.test>")).startswith("250")
    assert (await client.command(b"DATA")).startswith("354")


def delivered(app: App) -> list[bytes]:
    """Bodies at the relay, after the Received: header the proxy adds."""
    out = []
    for message in app.relay.received:  # type: ignore[attr-defined]
        data = message.data
        out.append(data[data.index(b"\r\n", data.index(b"; ")) + 2 :])
    return out


async def test_doubled_dots_come_off_and_a_dot_inside_a_line_stays(app: App) -> None:
    client = await RawClient.open(app.smtp_address)
    assert (await client.command(b"EHLO client.test")).startswith("250")
    await transaction(client)
    await client.send(b"..first\r\nSubject: x\r\n\r\n..\r\nmid.dle\r\n...two\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.0.0")
    await client.close()
    await wait_until(lambda: len(delivered(app)) == 1)
    assert delivered(app) == [b".first\r\nSubject: x\r\n\r\n.\r\nmid.dle\r\n..two\r\n"]


async def test_a_one_line_body_ends_at_the_dot_line_after_it(app: App) -> None:
    client = await RawClient.open(app.smtp_address)
    assert (await client.command(b"EHLO client.test")).startswith("250")
    await transaction(client)
    await client.send(b"hello\r\n.\r\n")
    assert (await client.reply(timeout=2)).startswith("250 2.0.0")
    await transaction(client)
    await client.send(b"\r\n.\r\n")  # one empty line
    assert (await client.reply(timeout=2)).startswith("250 2.0.0")
    await client.close()
    await wait_until(lambda: len(delivered(app)) == 2)
    assert delivered(app) == [b"hello\r\n", b"\r\n"]


async def test_pipelined_commands_after_the_end_are_the_next_commands(app: App) -> None:
    client = await RawClient.open(app.smtp_address)
    assert (await client.command(b"EHLO client.test")).startswith("250")
    await transaction(client)
    # Almost-ends inside the body (bare LF, missing CR) are body; only CRLF.CRLF ends it.
    await client.send(
        b"Subject: one\r\n\r\nA\n.\r\nB\r\n.\nC\r\n.\r\n"
        b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<c@rcpt.test>\r\nDATA\r\n"
    )
    assert (await client.reply()).startswith("250 2.0.0")
    assert (await client.reply()).startswith("250")
    assert (await client.reply()).startswith("250")
    assert (await client.reply()).startswith("354")
    await client.send(b".\r\n")  # an empty body
    assert (await client.reply()).startswith("250 2.0.0")
    assert (await client.command(b"QUIT")).startswith("221")
    await client.close()
    await wait_until(lambda: len(delivered(app)) == 2)
    # A line ".<LF>C" loses its leading dot like any other (as in aiosmtpd); bare LFs then
    # become CRLF, and the relay leg dot-stuffs again, so nothing ends early downstream.
    assert delivered(app)[0] == b"Subject: one\r\n\r\nA\r\n.\r\nB\r\n\r\nC\r\n"


async def test_an_oversized_body_is_read_to_its_end_and_refused_then_the_session_goes_on(
    app: App,
) -> None:
    client = await RawClient.open(app.smtp_address)
    assert (await client.command(b"EHLO client.test")).startswith("250")
    await transaction(client)
    await client.send(b"Subject: big\r\n\r\n" + (b"y" * 900 + b"\r\n") * 40 + b".\r\n")
    assert (await client.reply()).startswith("552 5.3.4")
    await transaction(client)
    await client.send(b"Subject: small\r\n\r\nfits\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.0.0")
    await client.close()
    await wait_until(lambda: len(delivered(app)) == 1)
    assert app.submitter.accepted == 1


async def test_an_overlong_first_line_is_refused_with_500_and_nothing_spooled(app: App) -> None:
    client = await RawClient.open(app.smtp_address)
    assert (await client.command(b"EHLO client.test")).startswith("250")
    await transaction(client)
    await client.send(b"X" * 1500 + b"\r\nrest\r\n.\r\n")
    assert (await client.reply()).startswith("500 5.5.2")
    assert (await client.command(b"NOOP")).startswith("250")
    await client.close()
    assert app.submitter.accepted == 0
