"""The test relay over real SMTP on 127.0.0.1, with aiosmtplib and (in a thread) smtplib."""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtpbalancer.sink import Sink, SinkMessage, _split_listen, run_sink

StartSink = Callable[..., Awaitable[Sink]]

BODY = (
    b"From: a@example.test\r\n"
    b"To: b@example.test\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"first line\r\n"
    b".starts with a dot, stuffed on the wire\r\n"
    b"..two dots\r\n"
    b"caf\xc3\xa9 8-bit\r\n"
)


@pytest.fixture
async def start_sink() -> AsyncIterator[StartSink]:
    sinks: list[Sink] = []

    async def start(**kwargs: Any) -> Sink:
        sink = Sink(**kwargs)
        await sink.start()
        sinks.append(sink)
        return sink

    try:
        yield start
    finally:
        for sink in sinks:
            await sink.stop()


@contextlib.asynccontextmanager
async def smtp_client(sink: Sink) -> AsyncIterator[aiosmtplib.SMTP]:
    host, port = sink.address
    async with aiosmtplib.SMTP(hostname=host, port=port, timeout=5) as client:
        yield client


async def test_accepts_message_keeps_exact_bytes_and_counts(start_sink: StartSink) -> None:
    sink = await start_sink(name="up-a", keep=True)
    async with smtp_client(sink) as client:
        refused, reply = await client.sendmail(
            "a@example.test", ["b@example.test", "c@example.test"], BODY
        )

    assert refused == {}
    assert "queued as up-a-1" in reply
    assert (sink.messages, sink.recipients, sink.connections) == (1, 2, 1)
    [message] = sink.received
    assert message.data == BODY
    assert message.mail_from == "a@example.test"
    assert message.rcpt_tos == ("b@example.test", "c@example.test")
    assert message.connection == 1
    assert message.received_mono <= asyncio.get_running_loop().time()
    assert repr(sink) == f"<Sink up-a 127.0.0.1:{sink.address[1]} msgs=1 conns=1>"


async def test_ehlo_advertises_what_the_proxy_uses(start_sink: StartSink) -> None:
    sink = await start_sink()
    async with smtp_client(sink) as client:
        await client.ehlo()
        for extension in ("8bitmime", "smtputf8", "pipelining", "size"):
            assert client.supports_extension(extension), extension


async def test_pipelined_commands_are_answered_in_order(start_sink: StartSink) -> None:
    sink = await start_sink(keep=True)
    reader, writer = await asyncio.open_connection(*sink.address)
    try:
        await reader.readuntil(b"\r\n")  # greeting
        writer.write(
            b"EHLO client.test\r\nMAIL FROM:<a@example.test>\r\n"
            b"RCPT TO:<b@example.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n"
        )
        replies: list[bytes] = []
        while not replies or not replies[-1].startswith(b"354"):
            line = await reader.readuntil(b"\r\n")
            if line[3:4] == b" ":  # last line of a (possibly multi-line) reply
                replies.append(line)
        writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        replies.append(await reader.readuntil(b"\r\n"))
        replies.append(await reader.readuntil(b"\r\n"))
    finally:
        writer.close()
        await writer.wait_closed()

    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert sink.received[0].rcpt_tos == ("b@example.test", "c@example.test")


async def test_hundred_messages_on_one_connection(start_sink: StartSink) -> None:
    sink = await start_sink()
    replies: list[str] = []
    async with smtp_client(sink) as client:
        for _ in range(100):
            _, reply = await client.sendmail("a@example.test", ["b@example.test"], BODY)
            replies.append(reply)

    assert (sink.messages, sink.recipients, sink.connections) == (100, 100, 1)
    assert len(set(replies)) == 100


async def test_rcpt_rule_refuses_one_recipient(start_sink: StartSink) -> None:
    def rule(rcpt: str) -> str | None:
        return "550 5.1.1 No such user" if rcpt.startswith("nobody@") else None

    sink = await start_sink(keep=True, rcpt_rule=rule)
    rcpts = ["b@example.test", "nobody@example.test", "c@example.test"]
    async with smtp_client(sink) as client:
        refused, reply = await client.sendmail("a@example.test", rcpts, BODY)

    assert list(refused) == ["nobody@example.test"]
    assert refused["nobody@example.test"].code == 550
    assert "No such user" in refused["nobody@example.test"].message
    assert "queued as" in reply
    assert (sink.messages, sink.recipients) == (1, 2)
    assert sink.received[0].rcpt_tos == ("b@example.test", "c@example.test")


async def test_tempfail_rate_one_refuses_every_rcpt_with_451(start_sink: StartSink) -> None:
    sink = await start_sink(tempfail_rate=1.0, seed=1)
    async with smtp_client(sink) as client:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as caught:
            await client.sendmail("a@example.test", ["b@example.test", "c@example.test"], BODY)

    assert [(r.code, r.message) for r in caught.value.recipients] == [
        (451, "4.3.0 Temporary failure (injected)")
    ] * 2
    assert (sink.tempfails, sink.permfails, sink.messages) == (2, 0, 0)


async def test_permfail_rate_one_refuses_every_rcpt_with_550(start_sink: StartSink) -> None:
    sink = await start_sink(permfail_rate=1.0)
    host, port = sink.address

    def send() -> None:
        with smtplib.SMTP(host, port, timeout=5) as client:
            client.sendmail("a@example.test", ["b@example.test"], BODY)

    with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
        await asyncio.to_thread(send)

    assert caught.value.recipients == {
        "b@example.test": (550, b"5.1.1 Recipient rejected (injected)")
    }
    assert (sink.tempfails, sink.permfails, sink.messages) == (0, 1, 0)


async def test_data_rule_refuses_and_delay_holds_the_reply(start_sink: StartSink) -> None:
    def rule(message: SinkMessage) -> str | None:
        return "554 5.6.0 Rejected by rule" if b"reject-me" in message.data else None

    sink = await start_sink(data_rule=rule, delay_s=0.05)
    async with smtp_client(sink) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            await client.sendmail("a@example.test", ["b@example.test"], b"reject-me\r\n")
        started = asyncio.get_running_loop().time()
        await client.sendmail("a@example.test", ["b@example.test"], BODY)
        elapsed = asyncio.get_running_loop().time() - started

    assert caught.value.code == 554
    assert elapsed >= 0.05
    assert (sink.messages, sink.recipients) == (1, 1)


async def test_maildir_stores_null_sender_message_in_new(
    start_sink: StartSink, tmp_path: Path
) -> None:
    sink = await start_sink(maildir=tmp_path / "box", keep=True)
    host, port = sink.address

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(host, port, timeout=5) as client:
            return client.sendmail("", ["b@example.test"], BODY)

    assert await asyncio.to_thread(send) == {}

    [stored] = (tmp_path / "box" / "new").iterdir()
    assert stored.read_bytes() == BODY
    assert sink.received[0].mail_from == ""


async def test_stop_aborts_idle_connection_and_frees_port(start_sink: StartSink) -> None:
    sink = await start_sink()
    host, port = sink.address
    client = aiosmtplib.SMTP(hostname=host, port=port, timeout=5)
    await client.connect()
    try:
        await client.ehlo()
        assert sink.open_connections == 1

        await sink.stop()
        await sink.stop()  # idempotent

        assert sink.open_connections == 0
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await client.noop()
    finally:
        client.close()

    again = await start_sink()
    await again.stop()
    assert await again.start(host, port) == (host, port)


async def test_run_sink_prints_address_and_final_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    task = asyncio.create_task(
        run_sink("127.0.0.1:0", maildir=None, tempfail_rate=0.0, permfail_rate=0.0, delay_s=0.0)
    )
    try:
        out = ""
        for _ in range(500):  # until run_sink has bound and printed its address
            out += capsys.readouterr().out
            if out:
                break
            await asyncio.sleep(0.01)
        assert out.startswith("sink listening on 127.0.0.1:")
        host, port = _split_listen(out.split()[-1])
        async with aiosmtplib.SMTP(hostname=host, port=port, timeout=5) as client:
            await client.sendmail("a@example.test", ["b@example.test"], BODY)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert capsys.readouterr().out.startswith("sink stopped messages=1 recipients=1 connections=1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:2525", ("127.0.0.1", 2525)), ("[::1]:25", ("::1", 25)), ("x:0", ("x", 0))],
)
def test_split_listen(text: str, expected: tuple[str, int]) -> None:
    assert _split_listen(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", ":25", "::1:25", "[::1]25", "h:70000", "h:-1"])
def test_split_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="listen address"):
        _split_listen(text)
