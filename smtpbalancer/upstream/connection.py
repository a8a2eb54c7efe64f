"""One SMTP client session to an upstream relay, on our own wire (wire.py).

Translates at the boundary (STYLE §7): a refusal at MAIL, RCPT or DATA is the
upstream answering about this message and comes back inside a SendResult
(including the case where every recipient is refused). Only a broken session
raises UpstreamError: connect failure, bad greeting, timeout, disconnect, a
421 at any step (RFC 5321 §3.8: the server is closing the channel), or a TLS
or AUTH failure.

Session setup is connect -> greeting -> EHLO -> [STARTTLS -> EHLO] -> [AUTH],
as `Security` says. TLS is never downgraded: when it is required ("starttls",
"implicit") or was attempted ("opportunistic" and the relay offered it), any
TLS failure breaks the session and nothing is retried in plaintext (RFC 3207
§4.1). Credentials are sent only over TLS or to a loopback address; a 535 to
AUTH is a broken session too, so the message is deferred, not bounced, and the
upstream's breaker hears about it. Secrets never reach a log line or a repr.
Each upstream has its own pool, so sessions with different credentials are
never mixed.

A transaction is two round trips when the relay offers PIPELINING (RFC 2920):
MAIL, every RCPT and DATA in one write, then the body once DATA got its 354.
Without it, one command per round trip. aiosmtplib could not do this (it drops a
reply nobody is waiting for), and its per-command overhead was a sixth of the
proxy's CPU, so the client is ours: replies are read by wire.ReplyReader.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from smtpbalancer.config import UpstreamConfig, UpstreamTls, is_loopback_host
from smtpbalancer.errors import UpstreamError
from smtpbalancer.replies import Reply, SendResult, upstream_queue_id
from smtpbalancer.tls import client_context
from smtpbalancer.upstream.wire import RawReply, ReplyReader, WireError

_ALL_REFUSED = Reply(554, "5.5.0", "all recipients refused")
# RFC 6531 §3.5: a non-ASCII address without SMTPUTF8 cannot be relayed.
_NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "non-ASCII address requires SMTPUTF8")


def _path(address: str, encoding: str) -> bytes | None:
    """`<address>` as bytes for MAIL/RCPT, or None if it cannot be encoded."""
    try:
        return b"<" + address.encode(encoding) + b">"
    except UnicodeEncodeError:
        return None


@dataclass(frozen=True, slots=True)
class Security:
    """How sessions to one upstream are protected: TLS mode and context, optional AUTH."""

    tls: UpstreamTls = UpstreamTls.NONE
    context: ssl.SSLContext | None = None  # None only with tls = NONE
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    plaintext_auth_ok: bool = False  # the peer is a loopback address

    @classmethod
    def of(cls, cfg: UpstreamConfig) -> Security:
        """Built once per upstream (loads the CA); shared by its pool's sessions and probe."""
        context = (
            None
            if cfg.tls is UpstreamTls.NONE
            else client_context(verify=cfg.tls_verify, ca=cfg.tls_ca)
        )
        return cls(cfg.tls, context, cfg.username, cfg.password, is_loopback_host(cfg.host))

    def without_credentials(self) -> Security:
        """The same TLS for health probes, which never AUTH."""
        return replace(self, username=None, password=None)


PLAINTEXT: Final = Security()


_CRLF: Final = b"\r\n"
_LINE_ENDS: Final = re.compile(rb"\r\n|\r|\n")


class UpstreamConnection:
    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        local_hostname: str,
        timeout_s: float,
        security: Security = PLAINTEXT,
    ) -> None:
        self.name = name
        self._host = host
        self._port = port
        self._hello_line = b"EHLO " + local_hostname.encode() + _CRLF
        self._timeout_s = timeout_s
        self._security = security
        self._wire: ReplyReader | None = None
        self._extensions: dict[str, str] = {}  # EHLO keyword (lower case) -> its parameters
        # What `send` asks of _extensions per transaction, looked up once per EHLO.
        self._pipelining = self._8bitmime = self._smtputf8 = False
        self.messages = 0  # transactions attempted on this connection
        self.broken = False
        self.idle_since = 0.0
        self.tls = security.tls is UpstreamTls.IMPLICIT  # encrypted (set once STARTTLS works)
        self.authenticated = False

    def __repr__(self) -> str:
        return (
            f"<UpstreamConnection {self.name} messages={self.messages} broken={self.broken}"
            f" tls={self.tls} auth={self.authenticated}>"
        )

    @property
    def usable(self) -> bool:
        return not self.broken and self._wire is not None and not self._wire.broken

    def supports(self, keyword: str) -> bool:
        """Whether the relay's last EHLO offered `keyword` (lower case)."""
        return keyword in self._extensions

    # --- session setup ---------------------------------------------------------------

    async def open(self) -> None:
        """Connect, greet, then TLS and AUTH as configured. Raises UpstreamError."""
        implicit = self._security.tls is UpstreamTls.IMPLICIT
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                _, self._wire = await loop.create_connection(
                    ReplyReader,
                    self._host,
                    self._port,
                    ssl=self._security.context if implicit else None,
                    server_hostname=self._host if implicit else None,
                )
        except TimeoutError:
            raise self._broken("connect", f"timed out after {self._timeout_s:g}s") from None
        except ssl.SSLError as exc:  # the implicit-TLS handshake
            raise self._broken("tls", _describe(exc)) from None
        except OSError as exc:
            raise self._broken("connect", _describe(exc)) from None
        code, text = await self._ask(None, "connect")
        if code != 220:
            raise self._broken("greeting", text, code)
        await self._hello("connect")
        await self._starttls()
        await self._login()

    async def _hello(self, stage: str) -> None:
        code, text = await self._ask(self._hello_line, stage)
        if code == 250:
            self._learn(_extensions(text))
            return
        if code != 421:  # an old server: HELO, and no extensions
            code, text = await self._ask(b"HELO" + self._hello_line[4:], stage)
        if code != 250:
            raise self._broken("greeting" if stage == "connect" else stage, text, code)
        self._learn({})

    def _learn(self, extensions: dict[str, str]) -> None:
        self._extensions = extensions
        self._pipelining = "pipelining" in extensions
        self._8bitmime = "8bitmime" in extensions
        self._smtputf8 = "smtputf8" in extensions

    async def _starttls(self) -> None:
        mode = self._security.tls
        if mode in (UpstreamTls.NONE, UpstreamTls.IMPLICIT):
            return
        if not self.supports("starttls"):
            if mode is UpstreamTls.STARTTLS:
                raise self._broken("tls", "STARTTLS required but not offered")
            return  # opportunistic: plaintext
        code, text = await self._ask(b"STARTTLS\r\n", "tls")
        if code != 220:
            raise self._broken("tls", text, code)
        wire = self._wire
        context = self._security.context
        assert wire is not None and wire.transport is not None and context is not None
        try:
            async with asyncio.timeout(self._timeout_s):
                upgraded = await asyncio.get_running_loop().start_tls(
                    wire.transport, wire, context, server_hostname=self._host
                )
        except TimeoutError:
            raise self._broken("tls", f"handshake timed out after {self._timeout_s:g}s") from None
        except (OSError, ssl.SSLError, RuntimeError) as exc:
            raise self._broken("tls", _describe(exc)) from None
        if upgraded is None:
            raise self._broken("tls", "connection lost during the handshake")
        wire.transport = upgraded
        await self._hello("tls")  # RFC 3207 §4.2: forget what was learnt before TLS
        self.tls = True

    async def _login(self) -> None:
        sec = self._security
        if sec.username is None:
            return
        if not self.tls and not sec.plaintext_auth_ok:
            raise self._broken("auth", "no TLS: credentials are never sent in clear")
        mechanisms = self._extensions.get("auth", "").upper().split()
        user = sec.username.encode()
        password = (sec.password or "").encode()
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            code, text = await self._ask(b"AUTH PLAIN " + token + _CRLF, "auth")
        elif "LOGIN" in mechanisms:
            code, text = await self._ask(b"AUTH LOGIN\r\n", "auth")
            for secret in (user, password):
                if code != 334:
                    break
                code, text = await self._ask(base64.b64encode(secret) + _CRLF, "auth")
        else:
            raise self._broken("auth", "the relay offers neither AUTH PLAIN nor AUTH LOGIN")
        if code != 235:
            raise self._broken("auth", text, code)
        self.authenticated = True

    # --- one transaction -----------------------------------------------------------

    async def send(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        body: bytes,
        *,
        smtputf8: bool = False,
        body_8bit: bool = False,
        crlf_clean: bool = False,
    ) -> SendResult:
        """Run one transaction. Raises UpstreamError if the session breaks.

        The addresses were validated at the front end (no control characters). With
        `crlf_clean` the caller vouches that every CR and LF of `body` is part of a CRLF
        (a body this process normalised itself), and its line ends are not counted again:
        that is three passes over the body, ~15% of the CPU of a 50 KiB message. Replies
        are awaited here, not in helpers: every frame on the await chain is resumed at
        every reply, so the pipelined path is written out in this one coroutine.
        """
        self.messages += 1
        envelope = self._envelope(mail_from, rcpts, smtputf8, body_8bit)
        if isinstance(envelope, SendResult):
            return envelope
        commands, asked, refused = envelope
        wire = self._wire
        if wire is None or self.broken:
            raise self._broken("mail", "not connected")
        if wire.unread:  # it spoke while idle: replies would be off by one
            raise self._broken("mail", "unexpected reply between transactions")
        sent = len(commands)
        if self._pipelining:  # RFC 2920: the whole group in one write
            try:
                wire.write(b"".join(commands))
                waiter = wire.expect(sent, self._timeout_s)
                if waiter is not None:
                    await waiter
                answers = wire.take(sent)
            except WireError as exc:
                self._check_421(exc.pending, sent)
                raise self._broken(_stage(len(exc.pending), sent), exc.reason) from None
            for code, _ in answers:
                if code == 421:  # rare: then find which one, and break there
                    self._check_421(answers, sent)
        else:
            answers = await self._one_by_one(commands)
        mail_reply = answers[0]
        if mail_reply[0] != 250:
            await self._abandon(answers, sent)
            return SendResult(refused={}, final=Reply.parse(*mail_reply), stage="mail")
        for rcpt, (code, text) in zip(asked, answers[1:], strict=False):
            if code != 250 and code != 251:
                refused[rcpt] = Reply.parse(code, text)
        if len(refused) == len(rcpts):
            await self._abandon(answers, sent)
            return SendResult(refused=refused, final=_ALL_REFUSED, stage="rcpt")
        code, text = answers[-1]
        if code != 354:
            await self._reset("data")
            return SendResult(refused=refused, final=Reply.parse(code, text))
        # The body, dots doubled, and the final dot; then its one reply.
        try:
            wire.write(_dot_stuffed(body, crlf_clean=crlf_clean))
            if wire.needs_drain:  # a large body, or the wire broke
                await wire.drain()
            waiter = wire.expect(1, self._timeout_s)
            if waiter is not None:
                await waiter
            code, text = wire.take(1)[0]
        except WireError as exc:
            for pending_code, pending_text in exc.pending:
                if pending_code == 421:
                    raise self._broken("data", pending_text, 421) from None
            raise self._broken("data", exc.reason) from None
        if code == 421:
            raise self._broken("data", text, 421)
        final = Reply.parse(code, text)
        queue_id = upstream_queue_id(final.text) if code == 250 else ""
        return SendResult(refused, final, queue_id)  # positional: cheaper, once per message

    def _envelope(
        self, mail_from: str, rcpts: Sequence[str], smtputf8: bool, body_8bit: bool
    ) -> tuple[list[bytes], list[str], dict[str, Reply]] | SendResult:
        """MAIL, a RCPT per recipient that can be encoded, and DATA; the recipients asked
        for and those refused already; or the result when nothing can be sent."""
        encoding = "utf-8" if smtputf8 else "ascii"
        sender = _path(mail_from, encoding)
        if sender is None:
            return SendResult(refused={}, final=_NEEDS_SMTPUTF8, stage="mail")
        mail = b"MAIL FROM:" + sender
        if body_8bit and self._8bitmime:
            mail += b" BODY=8BITMIME"
        if smtputf8 and self._smtputf8:
            mail += b" SMTPUTF8"
        commands = [mail + _CRLF]
        refused: dict[str, Reply] = {}
        asked: list[str] = []  # recipients sent in a RCPT, in order
        for rcpt in rcpts:
            path = _path(rcpt, encoding)
            if path is None:
                refused[rcpt] = _NEEDS_SMTPUTF8
            else:
                asked.append(rcpt)
                commands.append(b"RCPT TO:" + path + _CRLF)
        if not asked:
            return SendResult(refused=refused, final=_ALL_REFUSED, stage="rcpt")
        commands.append(b"DATA\r\n")
        return commands, asked, refused

    async def _one_by_one(self, commands: list[bytes]) -> list[RawReply]:
        """Without PIPELINING: stop after a refused MAIL, and before DATA if no RCPT passed."""
        answers: list[RawReply] = []
        last_rcpt = len(commands) - 2
        for index, command in enumerate(commands):
            stage = _stage(index, len(commands))
            answer = await self._ask(command, stage)
            if answer[0] == 421:
                raise self._broken(stage, answer[1], 421)
            answers.append(answer)
            if index == 0 and answer[0] != 250:
                break
            if index == last_rcpt and all(code not in (250, 251) for code, _ in answers[1:]):
                break
        return answers

    async def _abandon(self, answers: list[RawReply], sent: int) -> None:
        """End a transaction that will carry no message: a DATA the server took anyway
        (a 354 after every RCPT failed) gets a lone dot, then RSET (RFC 2920 §3.1)."""
        if len(answers) == sent and answers[-1][0] == 354:
            await self._ask(b".\r\n", "data")
        await self._reset("rset")

    async def _reset(self, stage: str) -> None:
        """RSET after a refusal. The outcome is known already; a relay that cannot RSET
        is not reused, but the refusal still stands."""
        code, _ = await self._ask(b"RSET\r\n", stage)
        if code != 250:
            self._fail()

    def _check_421(self, answers: list[RawReply], sent: int) -> None:
        """RFC 5321 §3.8: a 421 at any step means the server is closing the channel."""
        for index, (code, text) in enumerate(answers):
            if code == 421:
                raise self._broken(_stage(index, sent), text, code)

    # --- the wire --------------------------------------------------------------------

    def _live_wire(self, stage: str) -> ReplyReader:
        if self._wire is None or self.broken:
            raise self._broken(stage, "not connected")
        return self._wire

    async def _ask(self, command: bytes | None, stage: str) -> RawReply:
        """Send `command` (if any) and read one reply. Raises UpstreamError."""
        wire = self._live_wire(stage)
        try:
            if command is not None:
                wire.write(command)
            return (await wire.replies(1, self._timeout_s))[0]
        except WireError as exc:
            for code, text in exc.pending:
                if code == 421:
                    raise self._broken(stage, text, code) from None
            raise self._broken(stage, exc.reason) from None

    def _broken(self, stage: str, reason: str, code: int | None = None) -> UpstreamError:
        self._fail()
        return UpstreamError(self.name, stage, " ".join(reason.split())[:200], code)

    def _fail(self) -> None:
        self.broken = True
        if self._wire is not None and self._wire.transport is not None:
            self._wire.transport.close()

    async def close(self) -> None:
        """QUIT politely if the session is healthy; never raises."""
        if self.usable and self._wire is not None:
            with contextlib.suppress(WireError):
                self._wire.write(b"QUIT\r\n")
                await self._wire.replies(1, min(self._timeout_s, 2.0))
        self._fail()


def _stage(index: int, sent: int) -> str:
    """Which step the reply at `index` of a MAIL, RCPT..., DATA group answers."""
    if index == 0:
        return "mail"
    return "data" if index >= sent - 1 else "rcpt"


def _extensions(ehlo_reply: str) -> dict[str, str]:
    """EHLO keywords (lower case) and their parameters; the first line is the greeting.
    An old-style "AUTH=PLAIN LOGIN" line counts as AUTH."""
    found: dict[str, str] = {}
    for line in ehlo_reply.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.lower()
        if keyword.startswith("auth="):
            keyword, params = "auth", f"{keyword[5:]} {params}"
        found[keyword] = f"{found[keyword]} {params}" if keyword in found else params
    return found


def _dot_stuffed(body: bytes, *, crlf_clean: bool = False) -> bytes:
    """The body as sent after DATA's 354: CRLF line ends, dots doubled (RFC 5321 §4.5.2),
    and the final dot. Spooled bodies are CRLF-clean (the front end normalised them);
    unless the caller vouches for this one (`crlf_clean`: it never left this process's
    memory), three C-level counts make sure: every CR and LF is part of a CRLF pair."""
    if not crlf_clean:
        pairs = body.count(b"\r\n")
        if body.count(b"\r") != pairs or body.count(b"\n") != pairs:
            body = _LINE_ENDS.sub(b"\r\n", body)
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(_CRLF):
        stuffed += _CRLF
    return stuffed + b".\r\n"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]
