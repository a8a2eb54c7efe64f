"""The fast lane: a plain transaction's MAIL, RCPT, DATA and body, without a task switch.

aiosmtpd runs each session as one task that awaits its StreamReader for every
command line and for the body: five task wake-ups per message, each resuming a
stack of coroutine frames, the largest share of the front end's CPU. The lane
serves the same lines from `data_received`, synchronously, whenever the session's
task is parked waiting for a command line and nothing is queued in the reader
ahead of the new bytes. It gives the same replies and makes the same envelope
changes as the task would, with the same checks in the same order:

- guard.py's line discipline (`hardening.command_refusal`), verb and argument
  decoding, the STARTTLS requirement, and the idle timer;
- MAIL and RCPT: only the lines and session states in which server.py's own
  shortcut (commands.py) would answer, through the handler's synchronous hooks;
- DATA: only in a session that may send it (EHLO seen, no AUTH required, a
  recipient given, no argument); then 354, the `data_timeout`, and the body
  collected here until CRLF "." CRLF, exactly as `Guard._read_body` frames it.

The end of a body starts no task either: the handler's `data_then` hands the
message to the spool, and the reply (250 once it is durable, or 451) is written
from the spool batch's completion, in the loop turn the batch is durable. A body
over the size limit, or a failure the handler raises, is answered by a task, as
`Guard.answer_body` answers it. Bytes that arrive before the reply are held, and
served in order after it. Anything the lane does not take (any
other command, a line the shortcuts would refuse or hand to aiosmtpd, a partial
line, a reply that did not fit the socket buffer) goes to the StreamReader from
that byte on, and the task answers it as before; the lane opens again once the
task waits for a line with nothing buffered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar, Final, cast

from smtpbalancer.frontend import commands, hardening
from smtpbalancer.frontend.admission import session_ip
from smtpbalancer.frontend.guard import DATA_GO_AHEAD, END_OF_DATA, Guard
from smtpbalancer.frontend.handler import Handler

log = logging.getLogger(__name__)
_mail_log = logging.getLogger("mail.log")  # aiosmtpd's: when it logs, the task must answer

# Bytes that arrive while a body is being spooled are held, up to this much before the
# socket stops being read (a client may pipeline its next commands after the body).
HELD_MAX: Final = 64 * 1024
_CRLF: Final = b"\r\n"
_POSITIVE_MAX: Final = 64
_END: Final = len(END_OF_DATA)


class FastLane(Guard):
    enabled: ClassVar[bool] = True  # tests turn the lane off to compare with the task
    # status -> wire form of a 2xx/3xx reply, per class: reply_line is a class's own (_say)
    _positive: ClassVar[dict[str, bytes]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._positive = {}

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._hooks = handler
        self.in_data = False  # between DATA and the reply to the body
        self._body: Body | None = None
        self._answering = False  # a body's reply is pending: what arrives is held
        self._finishing: asyncio.Task[None] | None = None  # the task answering it, if one
        self._held = b""
        self._reading_paused = False

    def _plain_command_allowed(self) -> bool:
        """The session state in which aiosmtpd's MAIL, RCPT and DATA go on to their work."""
        session = self.session
        return (
            session is not None
            and bool(session.host_name)
            and not self._auth_required
            and self.envelope is not None
        )

    # --- asyncio.Protocol -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        while data:
            if self._body is not None:
                data = self._take_body(data)
            elif self._answering:
                self._hold(data)
                return
            elif self._lane_open():
                served = self._serve(data)
                if not served:
                    break
                data = data[served:]
            else:
                break
        if data:
            super().data_received(data)

    def _lane_open(self) -> bool:
        if not self.parked or not self.enabled:  # (a refused connection has no reader)
            return False
        reader: Any = self._reader
        return (
            not reader._buffer
            and self.connected
            and self._tls_handshake_okay
            and not (self.require_starttls and not self._tls_protocol)
            and not _mail_log.isEnabledFor(logging.INFO)
        )

    # --- command lines ------------------------------------------------------------------

    def _serve(self, data: bytes) -> int:
        """Answer the complete lines at the start of `data`; how many bytes were taken."""
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0 or not self._serve_line(data[start : end + 1]):
                return start
            start = end + 1
            if self._body is not None or self._backlogged():
                return start

    def _serve_line(self, line: bytes) -> bool:
        """Answer one command line (CRLF included), or leave it to the task: False."""
        session = self.session
        if session is None or not self._plain_command_allowed():
            return False
        if hardening.command_refusal(line, extended=bool(session.extended_smtp)) is not None:
            return False
        verb, _, arg_bytes = line[:-2].partition(b" ")
        verb = verb.upper()
        if verb == b"DATA":
            return self._data_line(arg_bytes)
        if verb != b"MAIL" and verb != b"RCPT":
            return False
        if not arg_bytes or (not self.enable_SMTPUTF8 and not arg_bytes.isascii()):
            return False
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape")
        return self._mail_line(arg) if verb == b"MAIL" else self._rcpt_line(arg)

    def _mail_line(self, arg: str) -> bool:
        session, envelope = self.session, self.envelope
        assert session is not None and envelope is not None
        if self._decode_data or envelope.mail_from:
            return False
        parsed = commands.simple_mail(
            arg,
            extended=bool(session.extended_smtp),
            size_limit=self.data_size_limit,
            smtputf8_enabled=self.enable_SMTPUTF8,
        )
        if parsed is None:
            return False
        address, options, smtputf8 = parsed
        self._reset_timeout()
        envelope.smtp_utf8 = smtputf8
        self._say(self._hooks.mail(self, session, envelope, address, options))
        return True

    def _rcpt_line(self, arg: str) -> bool:
        session, envelope = self.session, self.envelope
        assert session is not None and envelope is not None
        if not envelope.mail_from:
            return False
        address = commands.simple_rcpt(arg)
        if address is None:
            return False
        self._reset_timeout()
        self._say(self._hooks.rcpt(self, session, envelope, address, []))
        return True

    def _data_line(self, arg_bytes: bytes) -> bool:
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos or arg_bytes.strip():
            return False
        self._reset_timeout()
        self._reset_timeout(self._guard.data_timeout_s)
        self.in_data = True
        self._say(DATA_GO_AHEAD)
        self._body = Body(self.data_size_limit or 0)
        return True

    def _say(self, status: str) -> None:
        """Guard.push without the coroutine: the lane stops when the socket buffer fills.

        The wire form of a positive reply (a handful of constant lines) is kept; refusals
        always go through `reply_line`, which counts them."""
        known = self._positive
        data = known.get(status)
        if data is None:
            line = self.reply_line(status)
            data = line.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") + _CRLF
            if status[:1] in "23" and line.isascii() and len(known) < _POSITIVE_MAX:
                known[status] = data
        cast(asyncio.WriteTransport, self.transport).write(data)

    def _backlogged(self) -> bool:
        """Replies wait in our write buffer: the task takes over, and waits for the drain."""
        return bool(cast(asyncio.WriteTransport, self.transport).get_write_buffer_size())

    # --- the body -----------------------------------------------------------------------

    def _take_body(self, data: bytes) -> bytes:
        """Collect body bytes; once the end is in, start its answer. Returns what follows."""
        body = self._body
        assert body is not None
        done = body.take(data)
        if done is None:
            return b""
        wire, rest = done
        self._body = None
        self._answering = True
        if not self._answer_now(wire, body.too_big):
            self._finishing = self.loop.create_task(self._finish(wire, body.too_big))
        return rest

    def _answer_now(self, wire: bytes, too_big: bool) -> bool:
        """`Guard.answer_body` without a task, for the usual body: the handler spools it
        and the reply is written from the spool batch's completion, in the loop turn
        the batch is durable (the task would answer one turn later). False: the task
        must answer (a body over the limit, or a DATA hook that is not the handler's)."""
        hooks = self._hooks
        if too_big or self.envelope is None or self._data_hook != hooks.handle_DATA:
            return False
        self.take_content(wire)
        try:
            hooks.data_then(
                self, self.session, self.envelope, self._body_answered, self._body_failed
            )
        except Exception as error:  # before the hand-off: answer it as the task would
            self._body_failed(error)
        return True

    def _body_answered(self, status: str) -> None:
        """The DATA hook's reply: from the spool batch's completion, or a refusal."""
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        if self.connected:
            self._say(status)
        self._body_done()

    def _body_failed(self, error: Exception) -> None:
        """The DATA hook failed: a task answers it, as it answers any failure."""
        self._finishing = self.loop.create_task(self._finish(b"", False, failure=error))

    async def _finish(self, wire: bytes, too_big: bool, failure: Exception | None = None) -> None:
        """The task's answer to a body: `Guard.answer_body`, or the description of a
        `failure` the DATA hook raised on the lane (Guard._handle_client's contract)."""
        try:
            try:
                if failure is None:
                    await self.answer_body(wire, too_big)
                else:
                    await self.answer(await self._describe(failure))
            except ConnectionError:
                pass  # the client has gone; the message, if spooled, is on its way
            except Exception as error:  # the task's contract (Guard._handle_client): say it
                await self.answer(await self._describe(error))
        except ConnectionError:
            pass
        finally:
            self._finishing = None
            self.in_data = self._answering = False
        self._body_done()

    def _body_done(self) -> None:
        """The body's reply is out (or the client has gone): serve what was held."""
        self.in_data = self._answering = False
        if not self.connected:
            log.debug("smtp.reply_after_close client=%s", session_ip(self.session))
            return
        self._reset_timeout()
        held, self._held = self._held, b""
        if self._reading_paused:
            self._reading_paused = False
            cast(asyncio.ReadTransport, self.transport).resume_reading()
        if held:
            self.data_received(held)

    def _hold(self, data: bytes) -> None:
        self._held += data
        if len(self._held) > HELD_MAX and not self._reading_paused:
            self._reading_paused = True
            cast(asyncio.ReadTransport, self.transport).pause_reading()


class Body:
    """A DATA body arriving in pieces: where it ends, and whether it is over the limit.

    The end is a line "." after a line end, and the DATA command's own CRLF counts as
    one (an empty body), so the search runs over CRLF + body, as in `Guard._read_body`.
    Over `limit` octets (0: none) the body is dropped as it comes, keeping only enough
    to find the end.
    """

    __slots__ = ("_limit", "_seen", "too_big")

    def __init__(self, limit: int) -> None:
        self._seen = bytearray(_CRLF)
        self._limit = limit
        self.too_big = False

    def take(self, data: bytes) -> tuple[bytes, bytes] | None:
        """(the body as sent, the bytes after its end) once the end is in; else None."""
        seen = self._seen
        if len(seen) == 2 and not self.too_big:  # nothing yet: look in `data` itself
            if data.startswith(b".\r\n"):
                return b"", data[3:]
            end = data.find(END_OF_DATA)
            if end >= 0:
                self.too_big = 0 < self._limit < end + 2
                return (b"" if self.too_big else data[: end + 2]), data[end + _END :]
        start = max(len(seen) - _END + 1, 0)
        seen += data
        end = seen.find(END_OF_DATA, start)
        if end >= 0:
            size = end  # seen[2 : end + 2]
            if 0 < self._limit < size:
                self.too_big = True
            body = b"" if self.too_big else bytes(seen[2 : end + 2])
            return body, bytes(seen[end + _END :])
        # No end in `seen`, so it can start no earlier than its last 4 bytes ("\r\n.\r"),
        # and the body is at least len(seen) - 4 octets (the CRLF in front not counted).
        if self._limit and len(seen) - (_END - 1) > self._limit:
            self.too_big = True
        if self.too_big:
            del seen[: -(_END - 1)]  # what could still start the end
        return None
