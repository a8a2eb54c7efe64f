"""The inbound command loop: aiosmtpd's protocol with our line discipline and time bounds.

`Guard` replaces aiosmtpd's `_handle_client` (the loop that reads command lines)
so that every line is checked before aiosmtpd parses it (hardening.py), and
adds what a proxy facing untrusted networks needs. In order, per connection:

1. PROXY protocol (`proxy_protocol = true`): the TCP peer was already checked
   against `trusted_proxies` when the connection was made (server.py); here the
   v1/v2 header is read (within PROXY_HEADER_TIMEOUT_S) and its source address
   becomes the session's peer, so relay policy, per-client limits, logs and the
   Received: header see the real client. A LOCAL/UNKNOWN header (a balancer's
   health check) keeps the balancer's address. A missing or malformed header
   closes the connection without a reply: no SMTP was spoken yet.
2. Pre-greeting traffic (`greet_pause` > 0): a client that sends anything
   before our 220 gets 554 5.5.0 and is closed (Postfix postscreen's pregreet
   test; RFC 5321 §4.3.1: the client waits for the greeting).
3. Command lines: bare CR/LF/NUL -> 501 5.5.2, over 512 octets -> 500 5.5.2;
   unknown or malformed lines count against `max_unknown_commands`, and the
   one over the limit gets 421 4.7.0 and the connection is closed.
4. Time: `idle_timeout` runs from the last valid command (a client trickling
   one command line byte by byte does not reset it); the DATA command starts
   `data_timeout`, which bounds the whole DATA phase however the bytes trickle.
   Expiry sends 421 4.4.2 and closes; a message cut off this way never got a
   250 and was never spooled.

It must not decide relay policy or touch the spool: that is the handler's job.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final, cast

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import ALLOWED_BEFORE_STARTTLS, MISSING, SMTP, TLSSetupException

from smtpbalancer import metrics, replies
from smtpbalancer.config import ServerConfig
from smtpbalancer.frontend import hardening
from smtpbalancer.frontend.admission import session_ip
from smtpbalancer.frontend.dispatch_names import aiosmtpd_names
from smtpbalancer.replies import Reply

log = logging.getLogger(__name__)
_mail_log = logging.getLogger("mail.log")  # aiosmtpd's logger, for its push() debug line

PROXY_HEADER_TIMEOUT_S: Final = 10.0
END_OF_DATA: Final = b"\r\n.\r\n"
DATA_GO_AHEAD: Final = "354 End data with <CR><LF>.<CR><LF>"


class Guard(SMTP):
    # aiosmtpd's DATA reader refuses a wire line longer than this (CRLF included): one
    # more than a text line, for a dot doubled at its start; hardening.clean_body
    # checks the text lines once the doubled dots are gone.
    line_length_limit = hardening.MAX_TEXT_LINE + 1

    def __init__(
        self,
        handler: Any,
        *,
        config: ServerConfig | None = None,
        expect_proxy: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._guard = config or ServerConfig()
        # Not on the implicit-TLS listener: there the TLS handshake comes first.
        self.expects_proxy = expect_proxy
        self._proxied_peer: tuple[str, int] | None = None
        # Bound once: aiosmtpd's generic _call_handler_hook costs two coroutine frames a call.
        self._data_hook: Any = self._handle_hooks.get("DATA")
        # One deadline per session (see _reset_timeout); _armed_at is when the live timer
        # fires, None when none is armed.
        self._deadline = 0.0
        self._armed_at: float | None = None
        # True while the session's task waits for a command line (see fast_lane.py).
        self.parked = False
        self._continued: list[bytes] = []  # lines of a multi-line reply not yet written

    def __dir__(self) -> list[str]:
        return aiosmtpd_names(self)  # aiosmtpd's per-connection tables: see dispatch_names

    # --- hooks for the subclass ---------------------------------------------------

    def admit_proxied(self, client: str) -> Reply | None:
        """Called once the PROXY header named the real client; a Reply refuses it."""
        return None

    def say_and_close(self, reply: Reply) -> None:
        if self.transport is not None and not self.transport.is_closing():
            say_and_close(self.transport, reply)

    # --- aiosmtpd overrides -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._proxied_peer is not None and self.session is not None:
            session: Any = self.session  # aiosmtpd types peer as str; it holds the address tuple
            session.peer = self._proxied_peer  # STARTTLS starts a new Session

    def _timeout_cb(self) -> None:
        log.info("smtp.timeout client=%s", session_ip(self.session))
        self.say_and_close(replies.TIMEOUT)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and re-creates a timer per command (about 1% of the proxy's CPU).
        # Here a command only moves the deadline; the one timer is re-armed when it fires
        # early, or at once when the new deadline is sooner (data_timeout -> idle_timeout).
        # aiosmtpd's connection_lost still cancels self._timeout_handle.
        loop = self.loop
        deadline = loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        armed_at = self._armed_at
        if armed_at is not None and armed_at <= deadline:
            return
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._armed_at = deadline
        self._timeout_handle = loop.call_at(deadline, self._deadline_reached)

    def _deadline_reached(self) -> None:
        self._armed_at = None
        if self.loop.time() < self._deadline:  # moved on since the timer was armed
            self._armed_at = self._deadline
            self._timeout_handle = self.loop.call_at(self._deadline, self._deadline_reached)
            return
        self._timeout_cb()

    # --- writing replies ----------------------------------------------------------

    def reply_line(self, status: str) -> str:
        """Hook for the subclass: the wire form of a reply aiosmtpd or we push."""
        return status

    async def push(self, status: Any) -> None:
        """aiosmtpd's push (same encoding rules), without a drain() per reply.

        drain() only waits while the transport is paused above its high-water mark, or
        raises once the connection is lost or closing; with nothing buffered after the
        write and the transport open, it could do neither, so it is skipped.
        """
        if isinstance(status, str):
            line = self.reply_line(status)
            data = line.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") + b"\r\n"
        else:
            data = status + b"\r\n"
        if data[3:4] == b"-":  # a reply's continuation line: written with its last line
            self._continued.append(data)
            return
        if self._continued:  # EHLO's ten lines: one write and one segment, not ten
            self._continued.append(data)
            data = b"".join(self._continued)
            self._continued.clear()
        writer = self._writer
        transport = writer.transport
        transport.write(data)
        if _mail_log.isEnabledFor(logging.DEBUG):
            _mail_log.debug("%r << %r", getattr(self.session, "peer", None), data[:-2])
        if self.transport is None or transport.is_closing() or transport.get_write_buffer_size():
            await writer.drain()

    async def smtp_DATA(self, arg: str) -> None:
        self._reset_timeout(self._guard.data_timeout_s)
        try:
            await self._data(arg)
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self._reset_timeout()

    async def _data(self, arg: str) -> None:
        """aiosmtpd's DATA, with the body read in one piece instead of line by line.

        aiosmtpd awaits every line of the body (hundreds of coroutine steps for 50 KiB);
        here the reader scans its buffer for the terminator in C. Same checks and replies:
        a body over `data_size_limit` is read to its end, dropped and refused with 552;
        a wire line over `line_length_limit` (a doubled dot allowed) gets 500 once the
        body is in (hardening.clean_body checks the lines); RFC 5321 §4.5.2 dot removal;
        the end is CRLF "." CRLF exactly, and bytes after it stay in the reader (pipelining).
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push(DATA_GO_AHEAD)
        try:
            wire, too_big = await self._read_body()
        except asyncio.CancelledError:
            log.info("smtp.data_connection_lost client=%s", session_ip(self.session))
            self._writer.close()
            raise
        # Shielded: a client that hangs up while its message is being spooled must not
        # cancel the hand-off half-way (stored, yet never scheduled for delivery).
        await asyncio.shield(self.loop.create_task(self.answer_body(wire, too_big)))

    async def answer_body(self, wire: bytes, too_big: bool) -> None:
        """The end of DATA: 552 for a body over the limit, else dot removal, the DATA hook
        (which spools the message) and its reply. Raises what the hook raises."""
        assert self.envelope is not None
        if too_big:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.answer("552 Error: Too much mail data")
            return
        self.take_content(wire)
        hook = self._data_hook
        status = MISSING if hook is None else await hook(self, self.session, self.envelope)
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.answer("250 OK" if status is MISSING else status)

    def take_content(self, wire: bytes) -> None:
        """The body as sent, without its dot-stuffing, into the envelope."""
        assert self.envelope is not None
        content = wire.replace(b"\r\n.", b"\r\n")  # RFC 5321 §4.5.2: one leading dot goes
        if content.startswith(b"."):
            content = content[1:]
        self.envelope.content = content
        self.envelope.original_content = content
        if self.connected:
            self._reset_timeout()  # the body is in; the spool write is not the client's time

    @property
    def connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    async def answer(self, status: str) -> None:
        """`push`, unless the client has gone: the reply to a body can outlive the session."""
        if self.connected:
            await self.push(status)

    async def _read_body(self) -> tuple[bytes, bool]:
        """The body as sent (dots still doubled, without the final "." line), and whether
        it was over the size limit (then it was read to its end and dropped).

        The end is a line "." after a line end; the DATA command's own CRLF counts as one
        (an empty body), so the search runs over CRLF + body: a CRLF is put in front of
        what the reader holds, and taken off again with the body.
        """
        reader: Any = self._reader  # asyncio has no API to widen the limit of one read
        limit = self.data_size_limit or 0
        saved = reader._limit
        reader._limit = max(limit + len(END_OF_DATA) + 2, saved)
        reader._buffer[:0] = b"\r\n"
        too_big = False
        try:
            while True:
                try:
                    wire = await reader.readuntil(END_OF_DATA)
                    break
                except asyncio.LimitOverrunError as exc:  # over the limit: drop, keep reading
                    too_big = True  # (`consumed` leaves what could start the end)
                    await reader.readexactly(exc.consumed)
        finally:
            reader._limit = saved
        body = b"" if too_big else wire[2:-3]  # without the CRLF put in front and ".CRLF"
        return body, too_big or (limit > 0 and len(body) > limit)

    async def _handle_client(self) -> None:
        if self.expects_proxy and not await self._accept_proxy_header():
            if self.transport is not None:
                self.transport.close()
            return
        if not await self._quiet_before_greeting():
            return
        await self.push(f"220 {self.hostname} {self.__ident__}")
        bad_lines = 0
        while self.transport is not None:
            try:
                line = await self._command_line()
                error = line if isinstance(line, str) else await self._dispatch(line)
                if error is not None:
                    bad_lines += 1
                    if bad_lines > self._guard.max_unknown_commands:
                        log.info("smtp.bad_commands client=%s", session_ip(self.session))
                        self.say_and_close(replies.TOO_MANY_BAD_COMMANDS)
                        return
                    await self.push(error)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()
                raise
            except Exception as error:  # aiosmtpd's contract: report and carry on
                if isinstance(error, TLSSetupException):
                    if self.transport is not None:
                        self.transport.close()
                    self.connection_lost(error)
                    return
                await self.push(await self._describe(error))

    # --- the pieces ------------------------------------------------------------------

    async def _command_line(self) -> bytes | str:
        """One command line without its CRLF, or the reply that refuses it."""
        self.parked = True
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as error:
            self.parked = False
            await self._discard_line(error.consumed)
            return replies.COMMAND_TOO_LONG.line
        finally:
            self.parked = False
        assert self.session is not None
        refusal = hardening.command_refusal(line, extended=bool(self.session.extended_smtp))
        if refusal is not None:
            return refusal.line
        return line[:-2]

    async def _discard_line(self, consumed: int) -> None:
        await self._reader.read(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as more:
                await self._reader.read(more.consumed)

    async def _dispatch(self, line: bytes) -> str | None:
        """Run one command, or return the error for an unknown or unparsable one."""
        verb, _, arg_bytes = line.partition(b" ")
        try:
            command = verb.upper().decode("ascii")
        except UnicodeDecodeError:
            command = ""
        if not command:
            return "500 Error: bad syntax"
        arg: str | None = None
        if arg_bytes:
            if not self.enable_SMTPUTF8 and not arg_bytes.isascii():
                return "500 Error: strict ASCII mode"
            # surrogateescape keeps non-UTF-8 bytes recoverable, as aiosmtpd does
            arg = arg_bytes.strip().decode("utf-8", "surrogateescape")
        if not self._tls_handshake_okay and command != "QUIT":
            await self.push("554 Command refused due to lack of security")
            return None
        needs_tls = self.require_starttls and not self._tls_protocol
        if needs_tls and command not in ALLOWED_BEFORE_STARTTLS:
            await self.push("530 Must issue a STARTTLS command first")  # RFC 3207 §4
            return None
        method = self._smtp_methods.get(command)
        if method is None:
            return f'500 Error: command "{command[:20]}" not recognized'
        self._reset_timeout()  # a valid command: the client is alive
        await method(arg)
        return None

    async def _describe(self, error: Exception) -> str:
        try:
            status: str = await self.handle_exception(error)
        except Exception:
            log.exception("smtp.handler_error client=%s", session_ip(self.session))
            status = "500 Error: Cannot describe error"
        return status

    async def _quiet_before_greeting(self) -> bool:
        pause = self._guard.greet_pause_s
        if pause <= 0:
            return True
        try:
            async with asyncio.timeout(pause):
                early = await self._reader.read(1)
        except TimeoutError:
            return True
        if early:
            log.info("smtp.pregreet client=%s", session_ip(self.session))
            self.say_and_close(replies.TALKED_TOO_SOON)
        return False

    async def _accept_proxy_header(self) -> bool:
        assert self.session is not None
        try:
            async with asyncio.timeout(PROXY_HEADER_TIMEOUT_S):
                data = await get_proxy(self._reader)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            data = None
        if data is None or not data.valid:
            log.warning("smtp.proxy_header_invalid peer=%s", session_ip(self.session))
            return False
        if data.src_addr is not None:  # None: LOCAL/UNKNOWN, the balancer itself
            self._proxied_peer = (str(data.src_addr), int(data.src_port or 0))
            session: Any = self.session
            session.peer = self._proxied_peer
        refusal = self.admit_proxied(session_ip(self.session))
        if refusal is not None:
            self.say_and_close(refusal)
            return False
        return True


def say_and_close(transport: asyncio.BaseTransport, reply: Reply) -> None:
    """One reply line, then hang up (RFC 5321 §3.8 allows a 421 at any time)."""
    count_rejection(reply.line)
    # uvloop's transports are not asyncio.WriteTransport subclasses: cast, don't isinstance.
    writer = cast(asyncio.WriteTransport, transport)
    writer.write(reply.line.encode() + b"\r\n")
    writer.close()


# Refusals counted in smtpbalancer_messages_rejected_total{reason}: a fixed table, so the
# label stays bounded (never a sender, recipient or domain).
_REJECTION_REASONS = {
    replies.RELAY_DENIED.line: "relay_denied",
    replies.AUTH_REQUIRED.line: "auth_required",
    replies.STORAGE_LOW.line: "storage",
    replies.SPOOL_WRITE_FAILED.line: "spool_error",
    replies.TOO_MANY_RECIPIENTS.line: "too_many_recipients",
    replies.TOO_BIG.line: "too_big",
    replies.NUL_IN_DATA.line: "bad_data",
    replies.TEXT_LINE_TOO_LONG.line: "bad_data",
    replies.TOO_MANY_CONNECTIONS.line: "connections",
    replies.TOO_MANY_FROM_HOST.line: "client_connections",
    replies.SHUTTING_DOWN.line: "draining",
    replies.TOO_MANY_BAD_COMMANDS.line: "bad_commands",
    replies.TIMEOUT.line: "timeout",
    replies.TALKED_TOO_SOON.line: "pregreet",
    replies.UNTRUSTED_PROXY.line: "untrusted_proxy",
    replies.AUTH_TOO_MANY_FAILURES.line: "auth_failures",
}


def count_rejection(line: str) -> None:
    reason = _REJECTION_REASONS.get(line)
    if reason is not None:
        metrics.rejected(reason)


# Our overrides must keep aiosmtpd's per-command metadata (HELP text, syntax).
Guard.smtp_DATA.__dict__.update(SMTP.smtp_DATA.__dict__)
