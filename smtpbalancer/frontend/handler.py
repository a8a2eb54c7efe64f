"""aiosmtpd hooks: EHLO extensions, relay and limit checks, and the spool hand-off.

The handler owns per-session policy; it never imports spool, delivery or
upstream (it gets a Submitter and a PressureSource from app). DATA is answered
250 only from `Submitter.submit_then`'s callback, i.e. once body and envelope are
durable (invariant 1); a spool failure answers 451 4.3.0.

Backpressure: MAIL is refused with 452 4.3.1 when the spool or its disk has no
room, and otherwise reserves the declared SIZE= until RSET, end of DATA, the
next MAIL or disconnect, so that concurrent transactions cannot together
overrun the spool. Above the tarpit threshold the final 250 is held back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from smtpbalancer import headers, metrics, replies
from smtpbalancer.clock import Clock
from smtpbalancer.envelope import DEFAULT_POOL, Envelope
from smtpbalancer.errors import SpoolError
from smtpbalancer.frontend import admission, dedupe, hardening
from smtpbalancer.frontend.admission import Limits
from smtpbalancer.frontend.auth import Authenticator, tls_active
from smtpbalancer.frontend.dedupe import DedupeWindow
from smtpbalancer.frontend.dispatch_names import aiosmtpd_names
from smtpbalancer.frontend.routing import Router
from smtpbalancer.tasks import spawn

log = logging.getLogger(__name__)

_MESSAGE_ID = "Message-ID"
_MEMO_LIMIT = 4096  # entries per memo below; a full memo is emptied (peers and names are bounded)


class Submitter(Protocol):
    def next_queue_id(self) -> str: ...

    def submit_then(
        self,
        queue_id: str,
        envelope: Envelope,
        body: bytes,
        client: str,
        done: Callable[[Exception | None], None],
    ) -> None:
        """Store the message; `done(None)` on the loop once it is durable and scheduled,
        else `done(error)`: the SpoolError, or a failure to schedule it."""


class _Spooling(NamedTuple):
    """A message DATA is about to spool, and what its reply needs afterwards."""

    queue_id: str
    env: Envelope
    payload: bytes  # the Received: header + the cleaned body
    client: str
    keys: list[bytes]  # dedupe keys to remember once it is durable


class PressureSource(admission.Room, Protocol):
    """The spool's room (spool.capacity.Capacity); read per MAIL, so reads must be cheap."""

    def reserve(self, size: int) -> None: ...

    def release(self, size: int) -> None: ...

    def usage_percent(self) -> float: ...


class Handler:
    def __dir__(self) -> list[str]:
        return aiosmtpd_names(self)  # read on every connection: see dispatch_names

    def __init__(
        self,
        *,
        hostname: str,
        limits: Limits,
        submitter: Submitter,
        pressure: PressureSource,
        clock: Clock,
        auth: Authenticator | None = None,
        router: Router | None = None,
        dedupe: DedupeWindow | None = None,
        copy_headers: tuple[str, ...] = (),
    ) -> None:
        self._auth = auth
        self._router = router or Router((), DEFAULT_POOL)
        self.dedupe = dedupe
        self._copy_headers = copy_headers
        self._hostname = hostname
        self._limits = limits
        self._submitter = submitter
        self._pressure = pressure
        self._clock = clock
        # Bytes reserved by each connection's open transaction, keyed by the SMTP protocol
        # object (one per connection; aiosmtpd's Session is replaced on STARTTLS).
        self._reserved: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._tarpit_on = False
        # Memos for per-message work whose input rarely changes: the relay decision per
        # client address (emptied on reload), the Received: name per EHLO name, and the
        # Received: date per wall-clock second.
        self._relay_ok: dict[str, bool] = {}
        self._trace_names: dict[str, str] = {}
        self._date: tuple[int, str] = (-1, "")
        # (on, detail): the app turns these into incident events
        self.on_backpressure: Callable[[bool, str], None] = lambda on, detail: None

    def __repr__(self) -> str:
        return (
            f"<Handler reservations={len(self._reserved)}"
            f" tarpit={'on' if self._tarpit_on else 'off'}>"
        )

    def reconfigure(
        self,
        *,
        hostname: str,
        limits: Limits,
        router: Router | None = None,
        dedupe: DedupeWindow | None = None,
        copy_headers: tuple[str, ...] = (),
    ) -> None:
        """A reload: the relay policy, limits and routes apply from the next command on."""
        self._hostname = hostname
        self._limits = limits
        self._relay_ok = {}  # allow_networks may have changed
        self._router = router or self._router
        self.dedupe = dedupe
        self._copy_headers = copy_headers

    def connection_closed(self, server: Any) -> None:
        """Called by the session when its connection is lost: drop its reservation."""
        self._release(server)

    def _release(self, server: Any) -> None:
        if not self._reserved:  # the usual case (no SIZE=): skip building a weak reference
            return
        size = self._reserved.pop(server, 0)
        if size:
            self._pressure.release(size)

    def _may_relay(self, client_ip: str) -> bool:
        """admission.may_relay against allow_networks, memoised per client address."""
        allowed = self._relay_ok.get(client_ip)
        if allowed is None:
            allowed = admission.may_relay(client_ip, self._limits.allow_networks)
            if len(self._relay_ok) >= _MEMO_LIMIT:
                self._relay_ok.clear()
            self._relay_ok[client_ip] = allowed
        return allowed

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must record it itself
        extensions = [r[4:] for r in responses[1:] if r[4:].rstrip() not in ("HELP", "AUTH")]
        extensions += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        lines = [responses[0]] + [f"250-{e}" for e in extensions[:-1]]
        return [*lines, f"250 {extensions[-1]}"]

    # aiosmtpd inspects this hook's signature on every connection (old 4- or new
    # 5-argument form); computed once here, inspect.signature finds it at once.
    handle_EHLO.__signature__ = inspect.signature(handle_EHLO)  # type: ignore[attr-defined]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        return self.mail(server, session, envelope, address, options)

    def mail(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        """The MAIL hook's work, synchronous: the front end's fast lane calls it directly."""
        if admission.has_control_chars(address):
            return replies.BAD_ADDRESS.line
        client_ip = admission.session_ip(session)
        limits = self._limits
        refusal = admission.on_mail_relay(
            limits,
            client_ip,
            self._authenticated(server),
            allowed=self._may_relay(client_ip) if limits.auth_offered else None,
        )
        if refusal is not None:
            log.warning("smtp.auth_required client=%s", client_ip)
            return refusal.line
        self._release(server)  # left over from a transaction aborted without RSET (e.g. 552)
        size = admission.declared_size(options)
        refusal = admission.on_mail(self._pressure, size)
        if refusal is not None:
            log.debug("smtp.storage_low client=%s declared=%d %r", client_ip, size, self._pressure)
            return refusal.line
        if size:
            self._reserved[server] = size
            self._pressure.reserve(size)
        envelope.mail_from = address  # with a MAIL hook, aiosmtpd leaves these to us
        envelope.mail_options.extend(options)
        return replies.OK_SENDER.line

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self._release(server)
        return replies.OK.line

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        return self.rcpt(server, session, envelope, address, options)

    def rcpt(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        """The RCPT hook's work, synchronous (see `mail`)."""
        if admission.has_control_chars(address):
            return replies.BAD_ADDRESS.line
        client_ip = admission.session_ip(session)
        authenticated = self._authenticated(server)
        refusal = admission.on_rcpt(
            self._limits,
            client_ip,
            len(envelope.rcpt_tos),
            authenticated,
            allowed=None if authenticated else self._may_relay(client_ip),
        )
        if refusal is not None:
            if refusal is replies.RELAY_DENIED:
                log.warning(
                    "smtp.relay_denied client=%s rcpt_domain=%s",
                    client_ip,
                    address.rpartition("@")[2][:100],
                )
            return refusal.line
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)
        return replies.OK_RECIPIENT.line

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """aiosmtpd's DATA hook, for the session's task: `data_then`, awaited."""
        answered: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def reply(status: str) -> None:
            if not answered.done():  # (a task cancelled meanwhile no longer waits)
                answered.set_result(status)

        def failed(error: Exception) -> None:
            if not answered.done():
                answered.set_exception(error)

        self.data_then(server, session, envelope, reply, failed)
        return await answered

    def data_then(
        self,
        server: Any,
        session: Any,
        envelope: Any,
        reply: Callable[[str], None],
        failed: Callable[[Exception], None],
    ) -> None:
        """DATA without a task (the fast lane's; `handle_DATA` awaits it). `reply(status)`
        is called on the loop with the reply to the body, in the turn the spool's batch
        completes (or after the tarpit's delay); a refusal is replied to before this
        returns. `failed(error)` gets a failure after the hand-off; before it, this
        raises."""
        start = self._data_start(server, session, envelope)
        if isinstance(start, str):
            reply(start)
            return

        def stored(error: Exception | None) -> None:
            if error is not None and not isinstance(error, SpoolError):
                self._release(server)
                failed(error)
                return
            try:
                line = self._data_end(server, start, error)
                delay = 0.0 if error is not None else self._tarpit()
            except Exception as exc:
                failed(exc)
                return
            if delay:  # the message is durable; only the reply waits
                spawn(self._reply_later(delay, reply, line), name="smtp-tarpit")
            else:
                reply(line)

        self._submitter.submit_then(start.queue_id, start.env, start.payload, start.client, stored)

    async def _reply_later(self, delay: float, reply: Callable[[str], None], line: str) -> None:
        await self._clock.sleep(delay)
        reply(line)

    def _data_start(self, server: Any, session: Any, envelope: Any) -> str | _Spooling:
        """DATA's checks and the message as it will be spooled; a str is the refusal."""
        client_ip = admission.session_ip(session)
        # Bare CR/LF normalised, NUL refused, before spooling (hardening.py, invariant 7).
        content, refusal = hardening.clean_body(envelope.original_content)
        if refusal is not None:
            log.info("smtp.body_refused client=%s reply=%s", client_ip, refusal.status)
            self._release(server)
            return refusal.line
        mail_from = envelope.mail_from or ""
        if mail_from == "<>":
            mail_from = ""
        rcpts = tuple(dict.fromkeys(envelope.rcpt_tos))  # RCPT twice = one recipient
        user = self._auth.user(server) if self._auth is not None else None
        decision = self._router.route(sender=mail_from, rcpts=rcpts, user=user, message=content)
        if decision.strip_header is not None:
            content = headers.remove(content, decision.strip_header)
        noted: dict[str, str] = {}  # for dedupe and events only: one pass over the header
        if self.dedupe is not None or self._copy_headers:
            noted = headers.values(content, (_MESSAGE_ID, *self._copy_headers))
        message_id = noted.get(_MESSAGE_ID, "")
        env = Envelope(
            mail_from=mail_from,
            rcpt_tos=rcpts,
            smtputf8=bool(envelope.smtp_utf8),
            body_8bit="BODY=8BITMIME" in envelope.mail_options,
            pool=decision.pool,
            message_id=message_id,
            tags=tuple((name, noted[name]) for name in self._copy_headers if name in noted)
            if noted
            else (),
        )
        keys: list[bytes] = []
        if self.dedupe is not None and message_id:
            env, keys, first_copy = self._without_repeats(env, content)
            if first_copy is not None:
                self._release(server)
                log.info("smtp.duplicate client=%s queue_id=%s", client_ip, first_copy)
                return replies.duplicate(first_copy)
        queue_id = self._submitter.next_queue_id()
        trace = self._received(server, session, client_ip, queue_id, env)
        return _Spooling(queue_id, env, trace + content, client_ip, keys)

    def _data_end(self, server: Any, start: _Spooling, error: SpoolError | None) -> str:
        """The reply once the spool has answered: 250 with the queue id, or 451."""
        self._release(server)  # after submit: the stored bytes now count instead
        if error is not None:
            log.error("smtp.spool_failed client=%s error=%s", start.client, error)
            return replies.SPOOL_WRITE_FAILED.line
        if self.dedupe is not None and start.keys:
            self.dedupe.remember(start.keys, self._clock.monotonic(), start.queue_id)
        log.debug(
            "smtp.received queue_id=%s client=%s rcpts=%d size=%d",
            start.queue_id,
            start.client,
            len(start.env.rcpt_tos),
            len(start.payload),
        )
        return replies.queued(start.queue_id)

    def _without_repeats(
        self, env: Envelope, content: bytes
    ) -> tuple[Envelope, list[bytes], str | None]:
        """Drop recipients this message was already accepted for inside the dedupe window.

        Returns the envelope left, the keys to remember once it is durable, and, when no
        recipient is left, the queue id the first copy was accepted under.
        """
        assert self.dedupe is not None
        digest = dedupe.body_digest(content)
        keys = [dedupe.recipient_key(env.message_id, r, digest) for r in env.rcpt_tos]
        seen = self.dedupe.repeats(keys, self._clock.monotonic())
        repeats = sum(1 for s in seen if s is not None)
        if not repeats:
            return env, keys, None
        self.dedupe.suppressed += repeats
        metrics.DUPLICATES_SUPPRESSED.inc(repeats)
        if repeats == len(keys):
            return env, [], next(s for s in seen if s is not None)
        fresh = [(r, k) for r, k, s in zip(env.rcpt_tos, keys, seen, strict=True) if s is None]
        env = dataclasses.replace(env, rcpt_tos=tuple(r for r, _ in fresh))
        return env, [k for _, k in fresh], None

    def _tarpit(self) -> float:
        """The tarpit delay for this message; logs once when the tarpit engages or lifts."""
        usage = self._pressure.usage_percent()
        delay = admission.tarpit_delay(self._limits, usage)
        if (delay > 0) != self._tarpit_on:
            self._tarpit_on = delay > 0
            log.log(
                logging.WARNING if self._tarpit_on else logging.INFO,
                "backpressure.%s spool_usage_percent=%.1f tarpit_above_percent=%.1f delay_s=%.2f",
                "on" if self._tarpit_on else "off",
                usage,
                self._limits.tarpit_above_percent,
                delay,
            )
            self.on_backpressure(self._tarpit_on, f"spool usage {usage:.1f}%")
        return delay

    def _received(
        self, server: Any, session: Any, client_ip: str, queue_id: str, env: Envelope
    ) -> bytes:
        """RFC 5321 §4.4 trace header; the EHLO name is sanitised (invariant 7)."""
        helo = self._trace_name(session.host_name)
        protocol = admission.trace_protocol(
            extended=bool(session.extended_smtp),
            smtputf8=env.smtputf8,
            tls=tls_active(server),
            authenticated=self._authenticated(server),
        )
        date = self._date_header(self._clock.wall())
        for_clause = ""
        if len(env.rcpt_tos) == 1:
            for_clause = f"\r\n\tfor <{env.rcpt_tos[0]}>"
        text = (
            f"Received: from {helo} ([{client_ip}])\r\n\tby {self._hostname} (smtpbalancer)"
            f" with {protocol} id {queue_id}{for_clause}; {date}\r\n"
        )
        return text.encode("utf-8", "surrogateescape")

    def _trace_name(self, helo: str | None) -> str:
        if helo is None:
            return admission.trace_name(helo)
        name = self._trace_names.get(helo)
        if name is None:
            name = admission.trace_name(helo)
            if len(self._trace_names) >= _MEMO_LIMIT:
                self._trace_names.clear()
            self._trace_names[helo] = name
        return name

    def _date_header(self, wall: float) -> str:
        """RFC 5322 date of `wall`, formatted once per second (it shows whole seconds)."""
        second = int(wall)
        if self._date[0] != second:
            self._date = (second, email.utils.formatdate(second, usegmt=True))
        return self._date[1]

    def _authenticated(self, server: Any) -> bool:
        return self._auth is not None and self._auth.user(server) is not None

    # aiosmtpd prefers a handler's auth_<MECH> to its built-in one: ours can await the KDF.
    async def auth_PLAIN(self, server: Any, args: list[str]) -> Any:
        assert self._auth is not None  # excluded by the listener when no users file is set
        return await self._auth.plain(server, args)

    async def auth_LOGIN(self, server: Any, args: list[str]) -> Any:
        assert self._auth is not None
        return await self._auth.login(server, args)
