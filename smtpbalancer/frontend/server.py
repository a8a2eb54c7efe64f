"""The SMTP listener: sessions, the connection limits, enhanced status codes, drain.

aiosmtpd does the protocol (guard.py bounds it, and fast_lane.py answers a plain
transaction's lines without its task switches); this module owns the socket and the
session set.
- A connection over `max_connections` gets one 421 4.7.0 line and is closed
  (RFC 5321 §3.8), and so does one over `max_connections_per_client` from the
  same IP address; that check needs the peer address, so it happens in
  `connection_made`, before aiosmtpd starts the session or sends a greeting.
- Any new connection while draining gets 421 4.3.2 and is closed.
- Every reply aiosmtpd itself originates is given an RFC 3463 enhanced status
  code (we advertise ENHANCEDSTATUSCODES), except the greeting, EHLO/HELO
  lines, 354 and AUTH challenges, which RFC 2034 exempts.
- Graceful stop: drain, then close each session as soon as it is between
  transactions (421), and after the grace period abort whatever is left; a
  client cut off mid-DATA never got a 250, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import ssl
from collections.abc import Coroutine
from typing import Any, cast

from aiosmtpd.smtp import SMTP

from smtpbalancer import replies
from smtpbalancer.clock import Clock
from smtpbalancer.config import ServerConfig
from smtpbalancer.frontend import admission, commands
from smtpbalancer.frontend.auth import tls_active
from smtpbalancer.frontend.fast_lane import FastLane
from smtpbalancer.frontend.guard import count_rejection, say_and_close
from smtpbalancer.frontend.handler import Handler
from smtpbalancer.replies import Reply

log = logging.getLogger(__name__)
_mail_log = logging.getLogger("mail.log")  # aiosmtpd's logger: its MAIL/RCPT info lines

_HAS_STATUS = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_DEFAULT_STATUS = {
    221: "2.0.0", 250: "2.0.0", 251: "2.1.5", 252: "2.0.0",
    421: "4.3.2", 450: "4.0.0", 451: "4.3.0", 452: "4.3.1",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 535: "5.7.8", 538: "5.7.11", 550: "5.0.0", 552: "5.3.4", 553: "5.1.3",
    554: "5.0.0", 555: "5.5.4",
}  # fmt: skip
_OVERRIDES = {
    "552 Error: message size exceeds fixed maximum message size": replies.TOO_BIG.line,
    "552 Error: Too much mail data": replies.TOO_BIG.line,
}
_CACHE_LIMIT = 4096


def with_enhanced_status(line: str, cache: dict[str, str] = {}) -> str:  # noqa: B006 (memo)
    """Insert the RFC 3463 status that goes with a bare reply code (cached: replies repeat)."""
    done = cache.get(line)
    if done is not None:
        return done
    if _HAS_STATUS.match(line):  # e.g. "250 2.0.0 Ok: queued as <id>": unique, so not cached
        return line
    out = _OVERRIDES.get(line, line)
    if out is line and len(line) >= 3 and line[:3].isdigit() and not _HAS_STATUS.match(line):
        code = int(line[:3])
        status = _DEFAULT_STATUS.get(code) or (f"{line[0]}.0.0" if line[0] in "245" else "")
        if status:
            out = f"{line[:3]} {status}{line[3:]}"
    if len(cache) < _CACHE_LIMIT:
        cache[line] = out
    return out


class _Session(FastLane):
    def __init__(self, handler: Handler, frontend: FrontEnd, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._handler = handler
        self._frontend = frontend
        self._plain_push = False
        self._client: str | None = None  # IP counted against max_connections_per_client
        self._admitted = False  # False = refused at connect: aiosmtpd never saw it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the STARTTLS re-entry
            client = admission.client_ip(transport.get_extra_info("peername"))
            if self.expects_proxy:  # the client is counted once the PROXY header names it
                refusal = self._frontend.admit_balancer(self, client)
            elif self._frontend.admit(self, client):
                refusal, self._client = None, client
            else:
                refusal = replies.TOO_MANY_FROM_HOST
            if refusal is not None:
                # aiosmtpd never sees this connection: no session, no greeting, no task.
                say_and_close(transport, refusal)
                return
            self._admitted = True
        super().connection_made(transport)

    def admit_proxied(self, client: str) -> Reply | None:
        if not self._frontend.admit(self, client):
            return replies.TOO_MANY_FROM_HOST
        self._client = client
        return None

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return  # refused in connection_made; aiosmtpd has nothing to clean up
        self._frontend.forget(self, self._client)
        self._handler.connection_closed(self)
        super().connection_lost(error)

    def reply_line(self, status: str) -> str:
        if not self._plain_push and status[:1] in "245" and not status.startswith("220"):
            status = with_enhanced_status(status)
            count_rejection(status)
        return status

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        found = commands.SIMPLE_ADDRESS.match(arg) if arg else None
        if found is not None:
            return found.group(1), found.group(2)
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    async def smtp_MAIL(self, arg: str | None) -> None:
        # aiosmtpd's MAIL for the common line, with the same replies and envelope changes
        # (commands.py says which lines); any other line or state goes to aiosmtpd.
        parsed = None
        if self._plain_command_allowed() and not self._decode_data:
            assert self.session is not None and self.envelope is not None
            if not self.envelope.mail_from:  # else aiosmtpd: 503 nested MAIL
                parsed = commands.simple_mail(
                    arg,
                    extended=bool(self.session.extended_smtp),
                    size_limit=self.data_size_limit,
                    smtputf8_enabled=self.enable_SMTPUTF8,
                )
        if parsed is None:
            await super().smtp_MAIL(arg)
            return
        address, options, smtputf8 = parsed
        session, envelope = self.session, self.envelope
        assert session is not None and envelope is not None
        envelope.smtp_utf8 = smtputf8
        status = await self._handler.handle_MAIL(self, session, envelope, address, options)
        if _mail_log.isEnabledFor(logging.INFO):
            _mail_log.info("%r sender: %s", session.peer, address)
        await self.push(status)

    async def smtp_RCPT(self, arg: str | None) -> None:
        address = None
        if self._plain_command_allowed():
            assert self.envelope is not None
            if self.envelope.mail_from:  # else aiosmtpd: 503 need MAIL
                address = commands.simple_rcpt(arg)
        if address is None:
            await super().smtp_RCPT(arg)
            return
        session, envelope = self.session, self.envelope
        assert session is not None
        status = await self._handler.handle_RCPT(self, session, envelope, address, [])
        if _mail_log.isEnabledFor(logging.INFO):
            _mail_log.info("%r recip: %s", session.peer, address)
        await self.push(status)

    async def smtp_EHLO(self, arg: str) -> None:
        await self._without_enhanced_status(super().smtp_EHLO(arg))

    async def smtp_HELO(self, arg: str) -> None:
        await self._without_enhanced_status(super().smtp_HELO(arg))

    async def _without_enhanced_status(self, command: Coroutine[Any, Any, None]) -> None:
        # RFC 2034: the greeting and EHLO/HELO replies carry no enhanced status code.
        self._plain_push = True
        try:
            await command
        finally:
            self._plain_push = False

    async def smtp_STARTTLS(self, arg: str) -> None:
        if tls_active(self):  # RFC 3207 §4.2: one TLS layer; the implicit listener has one
            await self.push(replies.TLS_ALREADY_ACTIVE.line)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = False

    @property
    def in_transaction(self) -> bool:
        return self.in_data or (self.envelope is not None and self.envelope.mail_from is not None)

    def goodbye(self, reply: Reply) -> None:
        if self.transport is not None and not self.transport.is_closing():
            say_and_close(self.transport, reply)

    def abort(self) -> None:
        if self.transport is not None:
            cast(asyncio.WriteTransport, self.transport).abort()


class _Refuser(asyncio.Protocol):
    """Says one 421 line and hangs up: over the connection limit, or draining."""

    def __init__(self, reply: Reply) -> None:
        self._reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        say_and_close(transport, self._reply)


class FrontEnd:
    def __init__(
        self,
        config: ServerConfig,
        handler: Handler,
        clock: Clock,
        tls: ssl.SSLContext | None = None,
        auth: bool = False,
        reuse_port: bool = False,
    ) -> None:
        self._tls = tls  # STARTTLS on the listener, and the implicit-TLS listener's context
        self._auth = auth  # offer AUTH PLAIN/LOGIN (only once encrypted)
        self._reuse_port = reuse_port  # one of several workers sharing the port (workers.py)
        self._tls_server: asyncio.Server | None = None
        self.tls_address: tuple[str, int] | None = None
        self._config = config
        self._handler = handler
        self._clock = clock
        self.sessions: set[_Session] = set()
        self._per_client: collections.Counter[str] = collections.Counter()
        self._server: asyncio.Server | None = None
        self._draining = False
        self.refused_connections = 0

    @property
    def draining(self) -> bool:
        return self._draining

    def __repr__(self) -> str:
        state = "draining" if self._draining else "open"
        return (
            f"<FrontEnd {state} sessions={len(self.sessions)}/{self._config.max_connections}"
            f" clients={len(self._per_client)}>"
        )

    def reconfigure(self, config: ServerConfig) -> None:
        """A reload: limits and timeouts apply to sessions that start from now on."""
        self._config = config

    def admit(self, session: _Session, client: str) -> bool:
        """Count a new session against its client's limit; False = over the limit."""
        if self._per_client[client] >= self._config.max_connections_per_client:
            self.refused_connections += 1
            log.debug("smtp.too_many_from_host client=%s", client)
            return False
        self._per_client[client] += 1
        self.sessions.add(session)
        return True

    def admit_balancer(self, session: _Session, peer: str) -> Reply | None:
        """PROXY protocol: only a trusted balancer may connect (Haraka: DENYSOFT otherwise)."""
        if not admission.may_relay(peer, self._config.trusted_proxies):
            self.refused_connections += 1
            log.warning("smtp.untrusted_proxy peer=%s", peer)
            return replies.UNTRUSTED_PROXY
        self.sessions.add(session)
        return None

    def forget(self, session: _Session, client: str | None) -> None:
        self.sessions.discard(session)
        if client is None:
            return
        left = self._per_client[client] - 1
        if left > 0:
            self._per_client[client] = left
        else:
            del self._per_client[client]

    async def start(self) -> tuple[str, int]:
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            host=self._config.host,
            port=self._config.port,
            backlog=1024,
            reuse_port=self._reuse_port or None,
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        await self._start_implicit_tls(loop)
        return str(host), int(port)

    async def _start_implicit_tls(self, loop: asyncio.AbstractEventLoop) -> None:
        """The port-465 style listener (RFC 8314 §3.3): TLS from the first byte."""
        if self._config.tls_listen is None or self._tls is None:
            return
        host, port = self._config.tls_listen
        self._tls_server = await loop.create_server(
            functools.partial(self._protocol, implicit_tls=True),
            host=host,
            port=port,
            backlog=1024,
            reuse_port=self._reuse_port or None,
            ssl=self._tls,
            ssl_handshake_timeout=min(self._config.idle_timeout_s, 30.0),
        )
        tls_host, tls_port = self._tls_server.sockets[0].getsockname()[:2]
        self.tls_address = (str(tls_host), int(tls_port))

    def _security(self, implicit_tls: bool) -> dict[str, Any]:
        """aiosmtpd's TLS/AUTH options: AUTH only once encrypted (RFC 4954 §4, RFC 3207)."""
        return {
            # The implicit listener is encrypted already: no STARTTLS, and AUTH needs no upgrade.
            "tls_context": None if implicit_tls else self._tls,
            "auth_require_tls": not implicit_tls,
            "auth_exclude_mechanism": () if self._auth else ("PLAIN", "LOGIN"),
        }

    def _protocol(self, implicit_tls: bool = False) -> asyncio.BaseProtocol:
        if self._draining:
            self.refused_connections += 1
            return _Refuser(replies.SHUTTING_DOWN)
        if len(self.sessions) >= self._config.max_connections:
            self.refused_connections += 1
            return _Refuser(replies.TOO_MANY_CONNECTIONS)
        cfg = self._config
        return _Session(
            self._handler,
            self,
            hostname=cfg.hostname,
            ident="ESMTP smtpbalancer",
            data_size_limit=cfg.max_message_size_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=cfg.idle_timeout_s,
            loop=asyncio.get_running_loop(),
            config=cfg,
            expect_proxy=cfg.proxy_protocol and not implicit_tls,
            **self._security(implicit_tls),
        )

    async def stop(self, grace_s: float) -> None:
        """Drain: refuse new sessions, let transactions finish within grace_s, then close."""
        self._draining = True
        deadline = self._clock.monotonic() + grace_s
        while self.sessions:
            for session in list(self.sessions):
                if not session.in_transaction:
                    session.goodbye(replies.SHUTTING_DOWN)
            busy = [s for s in self.sessions if s.in_transaction]
            if not busy and not self.sessions:
                break
            if self._clock.monotonic() >= deadline:
                log.warning("smtp.drain_timeout sessions_aborted=%d", len(self.sessions))
                for session in list(self.sessions):
                    session.abort()
                break
            if busy:
                log.debug("smtp.draining sessions_in_transaction=%d", len(busy))
            await asyncio.sleep(0.05)
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._tls_server is not None:
            self._tls_server.close()
            self._tls_server = None


# Our overrides must keep aiosmtpd's per-command metadata (HELP text, syntax).
for _name in ("smtp_EHLO", "smtp_HELO", "smtp_MAIL", "smtp_RCPT", "smtp_DATA", "smtp_STARTTLS"):
    getattr(_Session, _name).__dict__.update(getattr(SMTP, _name).__dict__)
