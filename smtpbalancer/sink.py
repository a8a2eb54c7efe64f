"""A small test relay: an SMTP server that accepts mail, counts it and injects faults.

Used by `smtpbalancer sink`, the demo, the tests and the benchmarks as the upstream
the proxy relays to. It serves aiosmtpd's `SMTP` protocol straight from
`loop.create_server` (no threaded Controller), so it shares the caller's loop.

Invariants:
- The DATA reply is `250 2.0.0 Ok: queued as <name>-<n>`, unique per accepted message,
  so the proxy can parse an upstream queue id.
- Counters are plain ints changed only on the loop; an accepted message is counted
  after it is stored, so `messages` never runs ahead of the Maildir.
- Bodies are kept as received (`original_content`, dot-unstuffed) and never decoded.
- `stop()` closes the listener and aborts every open connection, and returns only
  once their session tasks have finished.
- With `tls_context` it offers STARTTLS (or, with `implicit_tls`, wraps the listener
  in TLS); with `users` it requires AUTH PLAIN/LOGIN before MAIL (after STARTTLS
  when STARTTLS is offered). Each SinkMessage records whether its session was
  encrypted and which user authenticated, so tests can assert both.

It must stay fast: nothing per message is logged above DEBUG, and the only disk
work (Maildir) runs in a thread, one write at a time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import mailbox
import random
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from smtpbalancer.replies import OK_RECIPIENT, OK_SENDER, Reply, queued

log = logging.getLogger(__name__)

DATA_SIZE_LIMIT: Final = 100 * 1024 * 1024
SUMMARY_EVERY_S: Final = 5.0

INJECTED_TEMPFAIL: Final = Reply(451, "4.3.0", "Temporary failure (injected)")
INJECTED_PERMFAIL: Final = Reply(550, "5.1.1", "Recipient rejected (injected)")
AUTH_REQUIRED: Final = Reply(530, "5.7.0", "Authentication required")

# mailbox.Maildir names its temporary files from a class-level counter that is not
# thread-safe, so concurrent add() calls from two sinks in one process could clash.
_MAILDIR_WRITES: Final = threading.Lock()


@dataclass(frozen=True, slots=True)
class SinkMessage:
    """One accepted message. `mail_from` is "" for the null sender."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # envelope.original_content exactly as received (after dot-unstuffing)
    connection: int  # serial number of the TCP connection it arrived on
    received_mono: float  # loop.time() at end of DATA
    tls: bool = False  # the session was encrypted (STARTTLS or implicit TLS)
    user: str | None = None  # who authenticated, if anyone


RcptRule: TypeAlias = Callable[[str], str | None]  # reply line to refuse, None to accept
MessageRule: TypeAlias = Callable[[SinkMessage], str | None]  # same, at end of DATA


class Sink:
    """An SMTP server that accepts (or refuses, on purpose) everything sent to it."""

    def __init__(
        self,
        *,
        name: str = "sink",
        maildir: Path | None = None,
        keep: bool = False,
        tempfail_rate: float = 0.0,
        permfail_rate: float = 0.0,
        delay_s: float = 0.0,
        rcpt_rule: RcptRule | None = None,
        data_rule: MessageRule | None = None,
        mail_rule: RcptRule | None = None,
        seed: int | None = None,
        hostname: str = "sink.test",
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        users: Mapping[str, str] | None = None,
    ) -> None:
        if implicit_tls and tls_context is None:
            raise ValueError(f"sink {name}: implicit_tls needs a tls_context")
        for label, rate in (("tempfail_rate", tempfail_rate), ("permfail_rate", permfail_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"sink {name}: {label} must be within [0, 1], got {rate}")
        if tempfail_rate + permfail_rate > 1.0:
            raise ValueError(f"sink {name}: tempfail_rate + permfail_rate must not exceed 1")
        if delay_s < 0:
            raise ValueError(f"sink {name}: delay_s must not be negative, got {delay_s}")
        self.name = name
        self.hostname = hostname
        self._maildir_path = maildir
        self._keep = keep
        self._tempfail_rate = tempfail_rate
        self._fail_rate = tempfail_rate + permfail_rate
        self._delay_s = delay_s
        self._rcpt_rule = rcpt_rule
        # A reply line for MAIL FROM (given the sender), or None to accept. Public so a
        # test can switch a relay's mood while it runs (e.g. a flapping relay).
        self.mail_rule = mail_rule
        self._data_rule = data_rule
        self._random = random.Random(seed)
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.users = dict(users) if users is not None else None
        self._hooks = _Hooks(self)
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._live: set[_SinkProtocol] = set()
        self._maildir: mailbox.Maildir | None = None
        self._maildir_turn = asyncio.Lock()  # one writer thread per sink, not one per message

        self.messages = 0
        self.recipients = 0
        self.connections = 0
        self.tempfails = 0
        self.permfails = 0
        self.auth_failures = 0
        self.received: list[SinkMessage] = []

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on host:port (0 picks a free port) and return the bound address."""
        if self._server is not None:
            raise RuntimeError(f"sink {self.name} is already started")
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        if self._maildir_path is not None and self._maildir is None:
            self._maildir = await asyncio.to_thread(
                mailbox.Maildir, self._maildir_path, create=True
            )
        loop = asyncio.get_running_loop()
        listener_tls = self.tls_context if self.implicit_tls else None
        self._server = await loop.create_server(
            lambda: _SinkProtocol(self, loop), host, port, ssl=listener_tls
        )
        bound = self._server.sockets[0].getsockname()
        self._address = (str(bound[0]), int(bound[1]))
        log.info("sink.started name=%s address=%s:%d", self.name, *self._address)
        return self._address

    async def stop(self) -> None:
        """Close the listener, abort open connections and wait for their sessions to end."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        aborted: set[_SinkProtocol] = set()
        closed = asyncio.ensure_future(server.wait_closed())
        # A connection accepted just before close() may not have reached connection_made
        # yet; keep aborting newcomers until the server has no connection left.
        while not closed.done():
            for protocol in self._live - aborted:
                protocol.abort()
                aborted.add(protocol)
            await asyncio.wait([closed], timeout=0.05)
        sessions = [p.session_task for p in aborted if p.session_task is not None]
        await asyncio.gather(*sessions, return_exceptions=True)
        log.info("sink.stopped name=%s aborted=%d %s", self.name, len(aborted), self.summary())

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError(f"sink {self.name} has not been started")
        return self._address

    @property
    def open_connections(self) -> int:
        return len(self._live)

    def summary(self) -> str:
        return (
            f"messages={self.messages} recipients={self.recipients} "
            f"connections={self.connections} tempfails={self.tempfails} "
            f"permfails={self.permfails}"
        )

    def __repr__(self) -> str:
        where = _format_hostport(*self._address) if self._address else "unbound"
        return f"<Sink {self.name} {where} msgs={self.messages} conns={self.connections}>"

    # --- called by the protocol and the hooks, on the loop ---------------------------

    def _connected(self, protocol: _SinkProtocol) -> int:
        self.connections += 1
        self._live.add(protocol)
        return self.connections

    def _disconnected(self, protocol: _SinkProtocol) -> None:
        self._live.discard(protocol)

    def _rcpt_reply(self, address: str) -> str | None:
        """The refusal line for a recipient, or None to accept it."""
        if self._rcpt_rule is not None:
            refusal = self._rcpt_rule(address)
            if refusal is not None:
                return refusal
        if self._fail_rate:
            draw = self._random.random()
            if draw < self._tempfail_rate:
                self.tempfails += 1
                return INJECTED_TEMPFAIL.line
            if draw < self._fail_rate:
                self.permfails += 1
                return INJECTED_PERMFAIL.line
        return None

    def _check_login(self, auth_data: object) -> bool:
        """Constant-time check of a LoginPassword against `users`; counts failures."""
        if self.users is not None and isinstance(auth_data, LoginPassword):
            expected = self.users.get(auth_data.login.decode("utf-8", "replace"))
            if expected is not None and hmac.compare_digest(
                expected.encode("utf-8"), auth_data.password
            ):
                return True
        self.auth_failures += 1
        return False

    async def _end_of_data(
        self, connection: int, envelope: Envelope, *, tls: bool, user: str | None
    ) -> str:
        mail_from = envelope.mail_from or ""
        message = SinkMessage(
            mail_from="" if mail_from == "<>" else mail_from,  # aiosmtpd spells null as "<>"
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            connection=connection,
            received_mono=asyncio.get_running_loop().time(),
            tls=tls,
            user=user,
        )
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        if self._data_rule is not None:
            refusal = self._data_rule(message)
            if refusal is not None:
                return refusal
        if self._maildir is not None:
            async with self._maildir_turn:
                await asyncio.to_thread(_store, self._maildir, message.data)
        self.messages += 1
        self.recipients += len(message.rcpt_tos)
        if self._keep:
            self.received.append(message)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "sink.accepted name=%s id=%s-%d conn=%d rcpts=%d bytes=%d",
                self.name,
                self.name,
                self.messages,
                connection,
                len(message.rcpt_tos),
                len(message.data),
            )
        return queued(f"{self.name}-{self.messages}")


def _store(box: mailbox.Maildir, data: bytes) -> None:
    with _MAILDIR_WRITES:
        box.add(data)


class _SinkProtocol(SMTP):
    """aiosmtpd's SMTP protocol, remembering its connection so `Sink.stop` can abort it."""

    def __init__(self, sink: Sink, loop: asyncio.AbstractEventLoop) -> None:
        starttls = sink.tls_context is not None and not sink.implicit_tls
        super().__init__(
            sink._hooks,
            data_size_limit=DATA_SIZE_LIMIT,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=sink.hostname,
            ident="smtpbalancer-sink",
            tls_context=sink.tls_context if starttls else None,
            # AUTH only after STARTTLS when STARTTLS is offered; an implicit-TLS or a
            # plaintext (loopback test) sink offers it at once. MAIL checks it (handle_MAIL):
            # aiosmtpd's own auth_required warns when TLS is not also required.
            auth_require_tls=starttls or sink.users is None,
            authenticator=_authenticator if sink.users is not None else None,
            loop=loop,
        )
        self.sink = sink
        self.serial = 0
        self.session_task: asyncio.Task[None] | None = None
        self._raw_transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._raw_transport is None
        super().connection_made(transport)
        if first:
            # A TCP stream transport on both loops; uvloop's does not subclass asyncio's.
            self._raw_transport = cast(asyncio.Transport, transport)
            self.serial = self.sink._connected(self)
            # aiosmtpd's per-connection task; awaited by Sink.stop, its exception
            # (a client reset) retrieved here so it is never reported as lost.
            self.session_task = self._handler_coroutine
            if self.session_task is not None:
                self.session_task.add_done_callback(_retrieve)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink._disconnected(self)
        super().connection_lost(error)

    def abort(self) -> None:
        if self._raw_transport is not None:
            self._raw_transport.abort()


def _authenticator(
    server: Any, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = cast(_SinkProtocol, server).sink._check_login(auth_data)
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        error = task.exception()
        if error is not None:
            log.debug("sink.session_ended error=%r", error)


class _Hooks:
    """The aiosmtpd handler: thin adapters from its untyped hooks to the Sink."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def handle_EHLO(
        self, server: Any, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> list[str]:
        session.host_name = hostname  # with an EHLO hook, aiosmtpd leaves this to us
        # aiosmtpd reads commands in order from a buffered stream, so pipelining works;
        # it just does not say so. RFC 2920.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if self._sink.users is not None and not session.authenticated:
            return AUTH_REQUIRED.line
        rule = self._sink.mail_rule
        if rule is not None and (refusal := rule(address)) is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return OK_SENDER.line

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        refusal = self._sink._rcpt_reply(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return OK_RECIPIENT.line

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        connection: int = server.serial
        tls = self._sink.implicit_tls or session.ssl is not None
        login: bytes | None = session.login_data if session.authenticated else None
        user = login.decode("utf-8", "replace") if login is not None else None
        return await self._sink._end_of_data(connection, envelope, tls=tls, user=user)


# --- `smtpbalancer sink` ----------------------------------------------------------------


async def run_sink(
    listen: str,
    *,
    maildir: Path | None,
    tempfail_rate: float,
    permfail_rate: float,
    delay_s: float,
) -> None:
    """Run a sink on "HOST:PORT" until cancelled, printing a summary when counts change."""
    host, port = _split_listen(listen)
    sink = Sink(
        maildir=maildir, tempfail_rate=tempfail_rate, permfail_rate=permfail_rate, delay_s=delay_s
    )
    bound = await sink.start(host, port)
    print(f"sink listening on {_format_hostport(*bound)}", flush=True)
    loop = asyncio.get_running_loop()
    shown, shown_at = (0, 0, 0, 0, 0), loop.time()
    try:
        while True:
            await asyncio.sleep(SUMMARY_EVERY_S)
            now = loop.time()
            counts = _counts(sink)
            if counts != shown:
                rate = (counts[0] - shown[0]) / max(now - shown_at, 1e-9)
                print(f"sink {sink.summary()} rate={rate:.1f}/s", flush=True)
                shown, shown_at = counts, now
    finally:
        await sink.stop()
        print(f"sink stopped {sink.summary()}", flush=True)


def _counts(sink: Sink) -> tuple[int, int, int, int, int]:
    return (sink.messages, sink.recipients, sink.connections, sink.tempfails, sink.permfails)


def _split_listen(text: str) -> tuple[str, int]:
    """Split "127.0.0.1:2525" or "[::1]:25" into host and port (0 = any free port)."""
    usage = f"listen address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:2525 or [::1]:25"
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(usage)
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or ":" in host:
            raise ValueError(usage)
    if not host or not port_text.isdigit() or not port_text.isascii():
        raise ValueError(usage)
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"listen address {text!r}: port must be 0-65535")
    return host, port


def _format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
