"""Done marks of finished messages, appended on the event loop, one write per loop turn.

A finished message's mark is its queue id on a line of its segment's `.done` file
(segment.py), with no fsync: a mark lost in a crash only means a redelivery, which
at-least-once allows. `append` buffers the id and waits; the first mark of a loop turn
schedules `flush` with `call_soon`, so every mark made in that turn goes out in one
os.write per segment, to an O_APPEND fd kept open. Each caller then resumes with its
mark written (not fsync'd); `post` buffers it without waiting (the store's
`remove_soon`). A failed write is logged and costs a redelivery after a crash; it is
never raised.

Why on the loop, against the rule that disk work goes to a thread: this is a
page-cache append (21 bytes a mark), no fsync, once per loop turn rather than once per
message: the same class of I/O as writing a log line, which never waits for the
device. Handing it to a thread cost more than the write itself: under load a thread
round trip per batch of ~4 marks was ~15 futex calls (GIL handoffs) plus an open and a
close. Opening a segment's `.done` (once, then cached; creating it, not durably) is the
only other call made here; fsyncs and unlinks stay on the store's cleanup thread.

Ordering with reclaim: the cleanup thread unlinks a segment's `.log` and `.done` once
nothing in it is live. The store calls `retire(seq)` just before it posts that
reclaim: buffered marks of the segment are written and its fd closed there and then.
No mark for it can follow (nothing in it is live, and sequence numbers are never
reused), so a late append never recreates a `.done` for a reclaimed segment, and no
cached fd points at an unlinked file. Other appenders of a `.done` (the writer's and an
operator's durable marks, the cleanup thread's marks for messages with sidecar files)
open it O_APPEND too, so lines are never overwritten.

Bounded: at most `max_open` fds, the least recently used closed first. Everything runs
on the loop except `wait_idle` and `close`, which the store may call from a thread at
shutdown; a lock keeps `close` from closing an fd under a write.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
from pathlib import Path
from typing import Final

from smtpbalancer.errors import SpoolError
from smtpbalancer.spool import segment

log = logging.getLogger(__name__)

MAX_OPEN: Final = 8  # the open segment and a few older ones finishing stragglers
_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class MarkAppender:
    """Done marks of one spool's segments, batched per loop turn (see the module doc)."""

    def __init__(self, directory: Path, *, max_open: int = MAX_OPEN) -> None:
        self._directory = directory
        self._max_open = max_open
        self._pending: dict[int, list[str]] = {}  # seq -> queue ids, this loop turn
        self._waiters: list[asyncio.Future[None]] = []
        self._scheduled = False
        self._fds: dict[int, int] = {}  # seq -> fd, least recently used first
        self._lock = threading.Lock()  # the fds, against `close` from another thread
        self._idle = threading.Event()  # nothing buffered
        self._idle.set()
        self._closed = False
        self.writes = 0
        self.marks = 0

    def __repr__(self) -> str:
        pending = sum(len(ids) for ids in self._pending.values())
        return (
            f"<MarkAppender marks={self.marks} writes={self.writes} pending={pending}"
            f" open={len(self._fds)}/{self._max_open}>"
        )

    async def append(self, seq: int, queue_id: str) -> None:
        """Mark `queue_id` done in segment `seq`; return once written (not fsync'd).
        Raises SpoolError only if the appender is closed."""
        if self._closed:
            raise SpoolError("spool marks closed")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)  # one each: a caller that gives up cancels only its own
        self.post(seq, queue_id)
        await waiter

    def post(self, seq: int, queue_id: str) -> None:
        """`append` without waiting (dropped once closed)."""
        if self._closed:
            return
        ids = self._pending.get(seq)
        if ids is None:
            self._pending[seq] = [queue_id]
        else:
            ids.append(queue_id)
        if not self._scheduled:
            # From the next loop turn: what else finishes in this one joins the write.
            self._scheduled = True
            self._idle.clear()
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write everything buffered (one write per segment) and wake its callers."""
        self._scheduled = False
        pending, self._pending = self._pending, {}
        waiters, self._waiters = self._waiters, []
        with self._lock:
            closed = self._closed
            if not closed:
                for seq, ids in pending.items():
                    self._write(seq, ids)
        for waiter in waiters:
            if waiter.done():  # its caller gave up (cancelled)
                continue
            if closed:
                waiter.set_exception(SpoolError("spool marks closed"))
            else:
                waiter.set_result(None)
        self._idle.set()

    def retire(self, seq: int) -> None:
        """Segment `seq` is about to be reclaimed: write its buffered marks now and close
        its fd. Its callers still resume at the turn's `flush`."""
        ids = self._pending.pop(seq, None)
        with self._lock:
            if ids and not self._closed:
                self._write(seq, ids)
            fd = self._fds.pop(seq, None)
            if fd is not None:
                _close(fd)

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every mark buffered so far is written (from a thread other than
        the loop's, which writes them). False on timeout."""
        return self._idle.wait(timeout_s)

    def close(self) -> None:
        """Close every fd; marks buffered from now on fail their callers (SpoolError)."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            _close(fd)

    def _write(self, seq: int, ids: list[str]) -> None:
        # Under the lock. One write: O_APPEND keeps the lines of each write together.
        payload = ("\n".join(ids) + "\n").encode("ascii")
        try:
            fd = self._fd(seq)
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                if written == 0:
                    raise OSError(errno.EIO, "write wrote nothing")
                view = view[written:]
        except OSError as exc:
            log.error("spool.done_mark_failed segment=%s errno=%s", seq, exc.errno)
            fd = self._fds.pop(seq, -1)  # reopened for the next mark
            if fd >= 0:
                _close(fd)
            return
        self.writes += 1
        self.marks += len(ids)

    def _fd(self, seq: int) -> int:
        fd = self._fds.pop(seq, None)
        if fd is None:
            fd = os.open(segment.done_path(self._directory, seq), _FLAGS, 0o600)
            while len(self._fds) >= self._max_open:
                _close(self._fds.pop(next(iter(self._fds))))
        self._fds[seq] = fd  # now the most recently used
        return fd


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):  # nothing was buffered in user space to lose
        os.close(fd)
