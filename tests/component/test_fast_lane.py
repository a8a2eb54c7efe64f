"""The fast lane answers exactly as the session's task does, and keeps what it was given.

Each script is played twice over a real socket, once with the lane and once without
(the session's task answers every line, as aiosmtpd's loop did), and everything a
client or the relay can observe must be the same: every reply, in order, and every
message the relay receives. Queue ids (and the Received: header's id and date) differ
between runs and are masked.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.proxy import make_config
from support.raw import RawClient
from support.waiting import wait_until

from smtpbalancer.app import App
from smtpbalancer.frontend.fast_lane import HELD_MAX, FastLane

_QUEUE_ID = re.compile(r"(?<=queued as )\S+")


@pytest.fixture
async def app(tmp_path: Path, sinks) -> AsyncIterator[App]:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool",
        [("relay", relay.address, 1)],
        server={"max_message_size": "2KB", "max_recipients": 3},
    )
    async with App(cfg) as started:
        started.relay = relay  # type: ignore[attr-defined]
        yield started


# 2,000 octets as sent, the fixture's max_message_size ("2KB").
_AT_LIMIT = b"Subject: edge\r\n\r\n" + b"a" * 990 + b"\r\n" + b"b" * 989 + b"\r\n"
assert len(_AT_LIMIT) == 2000

# A script: (bytes to send, how many replies they get). Lines a client may pipeline
# are sent together; bodies with what follows them.
Script = list[tuple[bytes, int]]
HELLO: Script = [(b"EHLO client.test\r\n", 1)]
SCRIPTS: dict[str, Script] = {
    "plain transactions, RSET and NOOP between": [
        *HELLO,
        (b"MAIL FROM:<a@sender.test>\r\n", 1),
        (b"RCPT TO:<b@rcpt.test>\r\n", 1),
        (b"RCPT TO:<c@rcpt.test>\r\n", 1),
        (b"DATA\r\n", 1),
        (b"Subject: one\r\n\r\nbody\r\n.\r\n", 1),
        (b"NOOP\r\n", 1),
        (b"MAIL FROM:<a@sender.test> SIZE=100 BODY=8BITMIME\r\n", 1),
        (b"RSET\r\n", 1),
        (b"mail from:<a@sender.test>\r\n", 1),
        (b"rcpt to:<d@rcpt.test>\r\n", 1),
        (b"data\r\n", 1),
        (b"Subject: two\r\n\r\n..dot\r\n.\r\n", 1),
        (b"QUIT\r\n", 1),
    ],
    "pipelined groups, with the next transaction after a body": [
        *HELLO,
        (b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@rcpt.test>\r\nRCPT TO:<c@rcpt.test>\r\n", 3),
        (b"DATA\r\n", 1),
        (b"Subject: one\r\n\r\nA\r\n.\r\nMAIL FROM:<e@sender.test>\r\nRCPT TO:<f@r.test>\r\n", 3),
        (b"DATA\r\n", 1),
        (b"Subject: two\r\n\r\nB\r\n.\r\nNOOP\r\nRSET\r\nQUIT\r\n", 4),
    ],
    "lines the shortcuts leave to aiosmtpd, between good ones": [
        *HELLO,
        (b"DATA\r\n", 1),  # 503: no RCPT
        (b"RCPT TO:<b@rcpt.test>\r\n", 1),  # 503: no MAIL
        (b"MAIL FROM:<a@sender.test> SIZE=99999999\r\n", 1),  # 552
        (b"MAIL FROM: <a@sender.test> FOO=1\r\n", 1),  # 555
        (b'MAIL FROM:<"quoted local"@sender.test>\r\n', 1),  # aiosmtpd's parser
        (b"MAIL FROM:<a@sender.test>\r\n", 1),  # 503 nested
        (b"RCPT TO:<b@rcpt.test> NOTIFY=NEVER\r\n", 1),  # 555
        (b"RCPT TO:b@rcpt.test\r\n", 1),  # aiosmtpd's parser
        (b"RCPT TO:<bad\x00@rcpt.test>\r\n", 1),  # NUL: line refused
        (b"RCPT TO:<c@rcpt.test>\nRCPT TO:<d@rcpt.test>\r\n", 2),  # bare LF ends a line
        (b"RCPT TO:<e@rcpt.test>\r\nRCPT TO:<f@rcpt.test>\r\n", 2),  # over max_recipients
        (b"DATA now\r\n", 1),  # 501
        (b"VRFY x\r\nDATA\r\n", 2),
        (b"Subject: three\r\n\r\nC\r\n.\r\n", 1),
        (b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@rcpt.test>\r\nDATA\r\n", 3),
        (b"Subject: big\r\n\r\n" + b"y" * 998 + b"\r\n" + b"z" * 998 + b"\r\n.\r\nNOOP\r\n", 2),
        (b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@rcpt.test>\r\nDATA\r\n", 3),
        (b"x" * 1200 + b"\r\n.\r\n", 1),  # an overlong line: 500
        (b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@rcpt.test>\r\nDATA\r\n", 3),
        (b".\r\n", 1),  # an empty body
        (b"QUIT\r\n", 1),
    ],
    "a command line that arrives in pieces": [
        *HELLO,
        (b"MAIL FR", 0),
        (b"OM:<a@sender.test>\r\nRCPT TO:<b@r", 1),
        (b"cpt.test>\r\n", 1),
        (b"DATA\r\n", 1),
        (b"one line\r\n.\r\n", 1),
        (b"QUIT\r\n", 1),
    ],
    "a body of exactly the size limit, cut inside its end": [
        *HELLO,
        (b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@rcpt.test>\r\nDATA\r\n", 3),
        (_AT_LIMIT + b".\r", 0),  # the end's last LF comes later
        (b"\nQUIT\r\n", 2),
    ],
}


async def play(app: App, script: Script, *, lane: bool) -> tuple[list[str], list[bytes]]:
    FastLane.enabled = lane
    try:
        before = len(app.relay.received)  # type: ignore[attr-defined]
        client = await RawClient.open(app.smtp_address)
        replies: list[str] = []
        for data, count in script:
            await client.send(data)
            await asyncio.sleep(0.01)  # pieces arrive as pieces
            replies += [_QUEUE_ID.sub("<id>", await client.reply()) for _ in range(count)]
        await client.close()
        accepted = sum(1 for r in replies if "queued as" in r)
        await wait_until(lambda: len(app.relay.received) - before == accepted)  # type: ignore[attr-defined]
        bodies = [  # after the Received: header, whose id and date differ
            m.data[m.data.index(b"\r\n", m.data.index(b"; ")) + 2 :]
            for m in app.relay.received[before:]  # type: ignore[attr-defined]
        ]
        return replies, sorted(bodies)
    finally:
        FastLane.enabled = True


@pytest.mark.parametrize("name", list(SCRIPTS))
async def test_the_lane_answers_as_the_task_does(app: App, name: str) -> None:
    by_task = await play(app, SCRIPTS[name], lane=False)
    by_lane = await play(app, SCRIPTS[name], lane=True)
    assert by_lane == by_task
    assert any(r.startswith("250 2.0.0 Ok: queued") for r in by_lane[0])


@pytest.mark.parametrize("lane", [True, False], ids=["fast lane", "session task"])
async def test_a_client_that_hangs_up_while_its_message_is_spooled_still_gets_it_relayed(
    app: App, lane: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message may be durable already: it must reach the relay, not wait for a restart."""
    storing = threading.Event()
    go_on = threading.Event()
    writer = app.store._writer
    append = writer.append

    def slow_append(*args: Any, **kwargs: Any) -> Any:  # on the commit thread
        storing.set()
        assert go_on.wait(10), "the loop was blocked: the commit ran on it"
        return append(*args, **kwargs)

    monkeypatch.setattr(writer, "append", slow_append)
    # A disk this slow has its commits on the thread (see spool/batch.py).
    monkeypatch.setattr(app.store._commits, "_on_loop_under_s", None)
    monkeypatch.setattr(FastLane, "enabled", lane)
    client = await RawClient.open(app.smtp_address)
    assert (await client.command(b"EHLO client.test")).startswith("250")
    assert (await client.command(b"MAIL FROM:<a@sender.test>")).startswith("250")
    assert (await client.command(b"RCPT TO:<b@rcpt.test>")).startswith("250")
    assert (await client.command(b"DATA")).startswith("354")
    await client.send(b"Subject: gone\r\n\r\nbye\r\n.\r\n")
    assert await asyncio.to_thread(storing.wait, 5)
    client.writer.transport.abort()
    await wait_until(lambda: not app.frontend.sessions)
    go_on.set()
    await wait_until(lambda: len(app.relay.received) == 1)  # type: ignore[attr-defined]
    await wait_until(lambda: app.store.messages == 0)


async def test_a_client_that_pipelines_a_flood_after_its_body_is_read_in_order(
    app: App,
) -> None:
    """Bytes held while a body is spooled are bounded (reading pauses) and served in order."""
    client = await RawClient.open(app.smtp_address)
    assert (await client.command(b"EHLO client.test")).startswith("250")
    assert (await client.command(b"MAIL FROM:<a@sender.test>")).startswith("250")
    assert (await client.command(b"RCPT TO:<b@rcpt.test>")).startswith("250")
    assert (await client.command(b"DATA")).startswith("354")
    noops = HELD_MAX // 6 + 100  # more than the lane holds
    await client.send(b"Subject: x\r\n\r\nx\r\n.\r\n" + b"NOOP\r\n" * noops + b"QUIT\r\n")
    assert (await client.reply()).startswith("250 2.0.0 Ok: queued")
    for _ in range(noops):
        assert await client.reply() == "250 2.0.0 OK"
    assert (await client.reply()).startswith("221")
    await client.close()


async def test_a_failure_after_the_spool_write_is_answered_as_the_task_answers_it(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug once the message is durable (here: scheduling its delivery) reaches the
    client through the handler's exception reply, on either path, and the session goes on."""
    enqueue = app.dispatcher.enqueue

    def broken_once(*args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(app.dispatcher, "enqueue", enqueue)
        raise RuntimeError("boom")

    async def one(lane: bool) -> list[str]:
        monkeypatch.setattr(app.dispatcher, "enqueue", broken_once)
        monkeypatch.setattr(FastLane, "enabled", lane)
        client = await RawClient.open(app.smtp_address)
        replies = [await client.command(b"EHLO client.test")]
        for line in (b"MAIL FROM:<a@sender.test>", b"RCPT TO:<b@rcpt.test>", b"DATA"):
            replies.append(await client.command(line))
        await client.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        replies.append(_QUEUE_ID.sub("<id>", await client.reply()))
        replies.append(await client.command(b"NOOP"))
        await client.close()
        return replies

    by_task = await one(lane=False)
    by_lane = await one(lane=True)
    assert by_lane == by_task
    assert not by_lane[4].startswith("250") and by_lane[5] == "250 2.0.0 OK"
