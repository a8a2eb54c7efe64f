"""The relay leg's SMTP client against scripted servers on 127.0.0.1.

A scripted relay that offers PIPELINING answers nothing until DATA has arrived, so a
client that waited for MAIL's reply before sending RCPT would hang and time out here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from support.raw import raw_server

from smtpbalancer.errors import UpstreamError
from smtpbalancer.replies import SendResult
from smtpbalancer.upstream.connection import UpstreamConnection

Rule = Callable[[bytes], bytes]


def ok(line: bytes) -> bytes:
    return b"250 2.0.0 Ok\r\n"


@dataclass
class ScriptedRelay:
    pipelining: bool = True
    mail: Rule = ok
    rcpt: Rule = ok
    data: Rule = lambda _: b"354 End data with <CR><LF>.<CR><LF>\r\n"
    final: bytes = b"250 2.0.0 Ok: queued as ABC123\r\n"
    trickle: bool = False  # write every reply one byte at a time
    commands: list[bytes] = field(default_factory=list)
    groups: list[list[bytes]] = field(default_factory=list)  # commands answered together
    bodies: list[bytes] = field(default_factory=list)
    overlapped: int = 0  # commands that arrived while one was still unanswered (no PIPELINING)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._say(writer, b"220 scripted.test ESMTP\r\n")
        group: list[bytes] = []
        pending = b""
        while line := await reader.readline():
            command = line.rstrip(b"\r\n")
            self.commands.append(command)
            verb = command.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                offer = b"250-PIPELINING\r\n" if self.pipelining else b""
                await self._say(writer, b"250-scripted.test\r\n" + offer + b"250 8BITMIME\r\n")
                continue
            if verb == b"QUIT":
                await self._say(writer, b"221 2.0.0 Bye\r\n")
                return
            reply = {
                b"MAIL": self.mail,
                b"RCPT": self.rcpt,
                b"DATA": self.data,
            }.get(verb, ok)(command)
            group.append(command)
            pending += reply
            if self.pipelining and verb in (b"MAIL", b"RCPT"):
                continue  # RFC 2920: the group's replies may wait for DATA
            if not self.pipelining:
                await asyncio.sleep(0.02)  # time for a pipelining client to send more
                self.overlapped += len(getattr(reader, "_buffer", b"")) > 0  # peek: the test
            self.groups.append(group)
            await self._say(writer, pending)
            answered, group, pending = pending, [], b""
            if b"\n421 " in b"\n" + answered:
                return
            if verb == b"DATA" and reply.startswith(b"354"):
                body = b""
                while not body.endswith(b"\r\n.\r\n") and body != b".\r\n":
                    more = await reader.readline()
                    if not more:
                        return
                    body += more
                self.bodies.append(body)
                await self._say(writer, self.final)

    async def _say(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if self.trickle:
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)
        else:
            writer.write(data)
            await writer.drain()


def connection(address: tuple[str, int], timeout_s: float = 2.0) -> UpstreamConnection:
    return UpstreamConnection("scripted", *address, local_hostname="p.test", timeout_s=timeout_s)


BODY = b"Subject: t\r\n\r\n.a line starting with a dot\r\nend\r\n"


async def one_transaction(relay: ScriptedRelay, rcpts: list[str]) -> SendResult:
    """Open a connection to the scripted relay, send BODY to `rcpts` once, close."""
    async with raw_server(relay) as address:
        conn = connection(address)
        await conn.open()
        result = await conn.send("a@s.test", rcpts, BODY)
        await conn.close()
    return result


async def test_mail_every_rcpt_and_data_go_out_as_one_group_when_the_relay_pipelines() -> None:
    relay = ScriptedRelay()
    result = await one_transaction(relay, ["b@r.test", "c@r.test"])
    assert result.final.code == 250 and result.refused == {}
    assert result.queue_id == "ABC123"
    assert relay.groups == [
        [b"MAIL FROM:<a@s.test>", b"RCPT TO:<b@r.test>", b"RCPT TO:<c@r.test>", b"DATA"]
    ]
    assert relay.bodies == [b"Subject: t\r\n\r\n..a line starting with a dot\r\nend\r\n.\r\n"]


async def test_one_command_per_round_trip_when_the_relay_does_not_pipeline() -> None:
    relay = ScriptedRelay(pipelining=False)
    result = await one_transaction(relay, ["b@r.test", "c@r.test"])
    assert result.final.code == 250
    assert relay.overlapped == 0
    assert [len(group) for group in relay.groups] == [1, 1, 1, 1]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_a_refused_recipient_is_reported_and_the_rest_delivered(pipelining: bool) -> None:
    def rcpt(line: bytes) -> bytes:
        return b"550 5.1.1 No such user\r\n" if b"bad@" in line else b"250 2.1.5 Ok\r\n"

    relay = ScriptedRelay(pipelining=pipelining, rcpt=rcpt)
    result = await one_transaction(relay, ["bad@r.test", "good@r.test"])
    assert result.final.code == 250
    assert list(result.refused) == ["bad@r.test"]
    assert result.refused["bad@r.test"].line == "550 5.1.1 No such user"


async def test_a_354_after_every_rcpt_failed_gets_a_lone_dot_then_rset() -> None:
    # RFC 2920 §3.1: the client cannot take DATA back; it ends it with an empty message.
    relay = ScriptedRelay(
        rcpt=lambda _: b"550 5.1.1 No such user\r\n", final=b"554 5.5.1 No valid recipients\r\n"
    )
    async with raw_server(relay) as address:
        conn = connection(address)
        await conn.open()
        result = await conn.send("a@s.test", ["x@r.test", "y@r.test"], BODY)
        again = await conn.send("a@s.test", ["x@r.test"], BODY)
        assert conn.usable
        await conn.close()
    assert result.stage == "rcpt" and result.final.code == 554
    assert set(result.refused) == {"x@r.test", "y@r.test"}
    assert relay.bodies[0] == b".\r\n", "an empty message, not the body"
    assert relay.commands[relay.commands.index(b"DATA") + 1] == b"RSET"
    assert again.stage == "rcpt"


async def test_a_refused_mail_resets_the_transaction_and_keeps_the_session() -> None:
    refuse = [True]

    def mail(_: bytes) -> bytes:
        if refuse.pop() if refuse else False:
            return b"553 5.1.8 Sender refused\r\n"
        return b"250 2.1.0 Ok\r\n"

    relay = ScriptedRelay(mail=mail, data=lambda _: b"503 5.5.1 No valid MAIL\r\n")
    async with raw_server(relay) as address:
        conn = connection(address)
        await conn.open()
        refused = await conn.send("a@s.test", ["b@r.test"], BODY)
        relay.data = ScriptedRelay().data
        delivered = await conn.send("a@s.test", ["b@r.test"], BODY)
        await conn.close()
    assert refused.stage == "mail" and refused.final.line == "553 5.1.8 Sender refused"
    assert b"RSET" in relay.commands
    assert delivered.final.code == 250


async def test_a_421_inside_the_group_breaks_the_session_at_that_step() -> None:
    relay = ScriptedRelay(rcpt=lambda _: b"421 4.3.2 Shutting down\r\n")
    async with raw_server(relay) as address:
        conn = connection(address)
        await conn.open()
        with pytest.raises(UpstreamError) as caught:
            await conn.send("a@s.test", ["b@r.test"], BODY)
    assert (caught.value.stage, caught.value.code) == ("rcpt", 421)
    assert "Shutting down" in caught.value.reason
    assert not conn.usable


async def test_replies_that_arrive_one_byte_at_a_time_are_read_whole() -> None:
    relay = ScriptedRelay(trickle=True)
    result = await one_transaction(relay, ["b@r.test", "c@r.test"])
    assert result.final.code == 250 and result.queue_id == "ABC123"


async def test_a_relay_that_never_answers_the_group_times_out() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mute.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-mute.test\r\n250 PIPELINING\r\n")
        await reader.read()  # reads the group, answers nothing

    async with raw_server(mute) as address:
        conn = connection(address, timeout_s=0.3)
        await conn.open()
        with pytest.raises(UpstreamError) as caught:
            await conn.send("a@s.test", ["b@r.test"], BODY)
    assert caught.value.stage == "mail"
    assert "timed out" in caught.value.reason
    assert not conn.usable


async def test_a_reply_nobody_asked_for_retires_the_session_before_the_next_transaction() -> None:
    # A relay that talks between transactions would shift every later reply by one.
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 chatty.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-chatty.test\r\n250 PIPELINING\r\n250 2.0.0 unsolicited\r\n")
        await reader.read()

    async with raw_server(chatty) as address:
        conn = connection(address)
        await conn.open()
        await asyncio.sleep(0.05)
        with pytest.raises(UpstreamError) as caught:
            await conn.send("a@s.test", ["b@r.test"], BODY)
    assert (caught.value.stage, caught.value.code) == ("mail", None)
    assert "unexpected reply" in caught.value.reason
