"""The SMTP client's wire: replies read from the socket, in order, however they arrive.

An asyncio Protocol rather than a StreamReader, because the relay leg pipelines
(RFC 2920): MAIL, every RCPT and DATA go out in one write, and their replies may
come back in one segment or several. `replies(n)` waits, with one timer, until n
complete replies are in and hands them out in order; replies that arrive before
anyone asks are kept, never dropped. (`expect(n)` and `take(n)` are its two halves,
for connection.py's send, which awaits the future itself.) The timeout is a deadline
per call, watched by one timer per connection that is re-armed only when it fires (a
timer per round trip was a visible share of the relay leg's CPU). A reply is its code
and its text lines joined by "\\n" (the continuation lines of a multi-line reply). The
usual segment (ASCII, CRLF line ends, one-line replies) is parsed inline in
data_received; every other line goes through _line.

A broken wire is a `WireError` with a short reason ("connection lost", "timed out
after 30s", "malformed reply"): connection.py turns it into an UpstreamError with the
stage it happened in. Nothing here knows SMTP commands.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

# A reply line longer than this, or a reply of more lines, is not an SMTP server talking.
MAX_REPLY_LINE: Final = 4096
MAX_REPLY_LINES: Final = 256

RawReply = tuple[int, str]


# "000".."999" -> int: a reply code checked (three ASCII digits) and converted in one lookup.
_CODES: Final = {f"{n:03d}": n for n in range(1000)}


class WireError(Exception):
    """The session cannot go on: lost, timed out or spoke nonsense."""

    def __init__(self, reason: str, pending: list[RawReply] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.pending = pending or []  # replies that did arrive (a 421 before the close)


class ReplyReader(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._lines: list[str] = []  # the reply being read, until its last line
        self._ready: deque[RawReply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        self._broken: str | None = None  # why the wire broke
        self.broken = False  # _broken is set: read per transaction, so a plain attribute
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        # One watchdog timer, not one per round trip: `replies` sets the deadline and arms
        # the timer only if none is armed at or before it; when the timer fires for a
        # deadline that has moved on, it re-arms for the current one.
        self._deadline = 0.0
        self._timeout_s = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
        # The usual segment is short (no line of it can be too long), ASCII, and each of
        # its LFs ends a CRLF: then it is decoded once and split at CRLF. Anything else
        # goes line by line in bytes, through _line.
        lines: list[str] | None = None
        if data.isascii() and len(data) <= MAX_REPLY_LINE:
            lines = data.decode("ascii").split("\r\n")
            if data.count(b"\n") != len(lines) - 1:
                lines = None
        if lines is None:
            raw_lines = data.split(b"\n")
            self._buffer = raw_lines.pop()  # what follows the last line end
            for raw in raw_lines:
                self._line(raw[:-1] if raw.endswith(b"\r") else raw)
        else:
            tail = lines.pop()
            self._buffer = tail.encode("ascii") if tail else b""
            ready = self._ready
            inline = self._broken is None and not self._lines  # nothing broken or pending
            for line in lines:
                # The common reply, inline: one line, "NNN text".
                code = _CODES.get(line[:3]) if inline else None
                if code is not None and line[3:4] == " ":
                    ready.append((code, line[4:]))
                else:
                    self._line(line.encode("ascii"))
                    inline = self._broken is None and not self._lines
        if len(self._buffer) > MAX_REPLY_LINE:
            self._break("reply line too long")
        waiter = self._waiter
        if waiter is not None and len(self._ready) >= self._wanted and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self._break("connection closed by the server")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._break("connection lost" if exc is None else f"connection lost: {exc}")
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # --- for connection.py ---------------------------------------------------------------

    @property
    def unread(self) -> int:
        """Replies that arrived and nobody asked for yet."""
        return len(self._ready)

    def write(self, data: bytes) -> None:
        if self._broken is not None or self.transport is None:
            raise WireError(self._broken or "not connected")
        self.transport.write(data)

    @property
    def needs_drain(self) -> bool:
        """Whether `drain` has anything to do (wait, or raise): a check, not a coroutine."""
        return self._paused or self._broken is not None

    async def drain(self) -> None:
        """Wait while the socket's send buffer is over its high-water mark (large bodies)."""
        while self._paused and self._broken is None:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self._broken is not None:
            raise WireError(self._broken)

    async def replies(self, count: int, timeout_s: float) -> list[RawReply]:
        """The next `count` replies, in order. Raises WireError."""
        waiter = self.expect(count, timeout_s)
        if waiter is not None:
            await waiter
        return self.take(count)

    def expect(self, count: int, timeout_s: float) -> asyncio.Future[None] | None:
        """`replies` in two steps, for a caller that awaits the future itself (one frame
        fewer on its await chain): None if `count` replies are in already, else a future
        that completes once they are, or the wire broke or timed out. Then `take(count)`.
        """
        if len(self._ready) >= count or self._broken is not None:
            return None
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._wanted = count
        self._deadline = deadline = loop.time() + timeout_s
        self._timeout_s = timeout_s
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._watch)
        return waiter

    def take(self, count: int) -> list[RawReply]:
        """The next `count` replies, once `expect` said they are in. Raises WireError (with
        the replies that did arrive) if the wire broke or timed out first."""
        ready = self._ready
        if len(ready) < count:
            raise WireError(
                self._broken or "no reply", [ready.popleft() for _ in range(len(ready))]
            )
        if count == len(ready):  # the usual: exactly what was asked for
            answers = list(ready)
            ready.clear()
            return answers
        return [ready.popleft() for _ in range(count)]

    # --- inside ---------------------------------------------------------------------------

    def _line(self, raw: bytes) -> None:
        """Any reply line but the common one data_received takes itself (its CR gone)."""
        if self._broken is not None:
            return
        code = raw[:3]
        separator = raw[3:4]
        if len(raw) > MAX_REPLY_LINE or not code.isdigit() or separator not in (b"", b" ", b"-"):
            self._break("malformed reply")
            return
        text = raw[4:].decode("utf-8", "surrogateescape")
        if separator == b"-":
            self._lines.append(text)
            if len(self._lines) > MAX_REPLY_LINES:
                self._break("reply has too many lines")
            return
        if self._lines:  # the last line of a multi-line reply
            self._lines.append(text)
            text = "\n".join(self._lines)
            self._lines = []
        self._ready.append((int(code), text))

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            self.broken = True
            if self.transport is not None:
                self.transport.close()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _watch(self) -> None:
        """The watchdog fired: time out the waiting `replies`, or re-arm for its deadline."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self._broken is not None:
            return  # nobody waits: the next `replies` arms it again
        loop = waiter.get_loop()
        if loop.time() >= self._deadline:
            self._break(f"timed out after {self._timeout_s:g}s")
        else:
            self._timer = loop.call_at(self._deadline, self._watch)
