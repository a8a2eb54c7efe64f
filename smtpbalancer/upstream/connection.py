"""One SMTP client session to an upstream relay: the only aiosmtplib user.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import aiosmtplib

from smtpbalancer.config import UpstreamConfig, UpstreamTls, is_loopback_host
from smtpbalancer.errors import UpstreamError
from smtpbalancer.replies import Reply, SendResult, upstream_queue_id
from smtpbalancer.tls import client_context

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
        self._security = security
        implicit = security.tls is UpstreamTls.IMPLICIT
        self._smtp = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            timeout=timeout_s,
            use_tls=implicit,
            start_tls=False,  # we decide below, after EHLO; aiosmtplib never upgrades alone
            tls_context=security.context,
            local_hostname=local_hostname,
        )
        self.messages = 0  # transactions attempted on this connection
        self.broken = False
        self.idle_since = 0.0
        self.tls = implicit  # the session is encrypted (set once STARTTLS succeeds)
        self.authenticated = False

    def __repr__(self) -> str:
        return (
            f"<UpstreamConnection {self.name} messages={self.messages} broken={self.broken}"
            f" tls={self.tls} auth={self.authenticated}>"
        )

    @property
    def usable(self) -> bool:
        return not self.broken and self._smtp.is_connected

    async def open(self) -> None:
        """Connect, greet, then TLS and AUTH as configured. Raises UpstreamError."""
        try:
            await self._smtp.connect()
            await self._hello()
        except aiosmtplib.SMTPResponseException as exc:
            raise self._broken("greeting", exc.message, exc.code) from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            # An implicit-TLS handshake failure surfaces as a connect error.
            stage = "tls" if isinstance(exc.__cause__, ssl.SSLError) else "connect"
            raise self._broken(stage, _describe(exc)) from None
        await self._starttls()
        await self._login()

    async def _hello(self) -> None:
        try:
            await self._smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            await self._smtp.helo()

    async def _starttls(self) -> None:
        mode = self._security.tls
        if mode in (UpstreamTls.NONE, UpstreamTls.IMPLICIT):
            return
        if not self._smtp.supports_extension("starttls"):
            if mode is UpstreamTls.STARTTLS:
                raise self._broken("tls", "STARTTLS required but not offered")
            return  # opportunistic: plaintext
        try:
            await self._smtp.starttls()
            await self._hello()  # RFC 3207 §4.2: forget what was learnt before TLS
        except aiosmtplib.SMTPResponseException as exc:
            raise self._broken("tls", exc.message, exc.code) from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise self._broken("tls", _describe(exc)) from None
        self.tls = True

    async def _login(self) -> None:
        sec = self._security
        if sec.username is None:
            return
        if not self.tls and not sec.plaintext_auth_ok:
            raise self._broken("auth", "no TLS: credentials are never sent in clear")
        try:
            await self._smtp.login(sec.username, sec.password or "")
        except aiosmtplib.SMTPResponseException as exc:
            raise self._broken("auth", exc.message, exc.code) from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise self._broken("auth", _describe(exc)) from None
        self.authenticated = True

    def _broken(self, stage: str, reason: str, code: int | None = None) -> UpstreamError:
        self._fail()
        return UpstreamError(self.name, stage, reason, code)

    async def send(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        body: bytes,
        *,
        smtputf8: bool = False,
        body_8bit: bool = False,
    ) -> SendResult:
        """Run one transaction. Raises UpstreamError if the session breaks.

        MAIL and RCPT go through `execute_command` with addresses we already
        validated at the front end (no control characters), which spares
        aiosmtplib's per-command address re-parsing.
        """
        self.messages += 1
        smtp = self._smtp
        encoding = "utf-8" if smtputf8 else "ascii"
        options = []
        if body_8bit and smtp.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        if smtputf8 and smtp.supports_extension("smtputf8"):
            options.append(b"SMTPUTF8")
        stage = "mail"
        try:
            sender = _path(mail_from, encoding)
            if sender is None:
                return SendResult(refused={}, final=_NEEDS_SMTPUTF8, stage=stage)
            reply = await self._command(stage, b"MAIL", b"FROM:" + sender, *options)
            if reply.code != 250:
                await smtp.rset()
                return SendResult(refused={}, final=reply, stage=stage)
            stage = "rcpt"
            refused: dict[str, Reply] = {}
            for rcpt in rcpts:
                path = _path(rcpt, encoding)
                reply = (
                    _NEEDS_SMTPUTF8
                    if path is None
                    else await self._command(stage, b"RCPT", b"TO:" + path)
                )
                if reply.code not in (250, 251):
                    refused[rcpt] = reply
            if len(refused) == len(rcpts):
                await smtp.rset()  # RFC 5321 §3.3: no DATA without an accepted recipient
                return SendResult(refused=refused, final=_ALL_REFUSED, stage=stage)
            stage = "data"
            try:
                response = await self._data(body)
            except aiosmtplib.SMTPDataError as exc:
                self._check_421(exc.code, exc.message, stage)
                await smtp.rset()
                return SendResult(refused=refused, final=Reply.parse(exc.code, exc.message))
        except UpstreamError:
            raise
        except aiosmtplib.SMTPResponseException as exc:
            self._fail()
            raise UpstreamError(self.name, stage, exc.message, exc.code) from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            self._fail()
            raise UpstreamError(self.name, stage, _describe(exc)) from None
        final = Reply.parse(response.code, response.message)
        return SendResult(refused=refused, final=final, queue_id=upstream_queue_id(final.text))

    async def _data(self, body: bytes) -> aiosmtplib.SMTPResponse:
        """DATA, the body, the final dot. Spooled bodies are CRLF-clean already (the front
        end normalised them), so only dots are doubled, by C-level replaces; aiosmtplib's
        data() would run two regular expressions over every body (~1 ms for 50 KiB)."""
        if not _crlf_clean(body):
            return await self._smtp.data(body)
        protocol = self._smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        timeout = self._smtp.timeout
        start = await protocol.execute_command(b"DATA", timeout=timeout)
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        stuffed = body.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        if stuffed and not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        # No await between the write and read_response: the reply cannot arrive unawaited.
        protocol.write(stuffed + b".\r\n")
        response = await protocol.read_response(timeout=timeout)
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    async def _command(self, stage: str, *args: bytes) -> Reply:
        response = await self._smtp.execute_command(*args)
        self._check_421(response.code, response.message, stage)
        return Reply.parse(response.code, response.message)

    def _check_421(self, code: int, message: str, stage: str) -> None:
        if code == 421:
            self._fail()
            raise UpstreamError(self.name, stage, message, code)

    def _fail(self) -> None:
        self.broken = True
        self._smtp.close()

    async def close(self) -> None:
        """QUIT politely if the session is healthy; never raises."""
        if self.usable:
            with contextlib.suppress(TimeoutError, aiosmtplib.SMTPException, OSError):
                await asyncio.wait_for(self._smtp.quit(), timeout=2.0)
        self._smtp.close()
        self.broken = True


def _crlf_clean(body: bytes) -> bool:
    """Every CR and LF in `body` is part of a CRLF pair (three C-level counts)."""
    pairs = body.count(b"\r\n")
    return body.count(b"\r") == pairs and body.count(b"\n") == pairs


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]
