"""A durable outbox of events: an append-only, group-committed log drained in order.

On disk, one directory per outbox (e.g. `<spool>/events/delivery/`; segments.py):

    0000000007.log   one record a line: "<crc32 hex> <JSON>\\n" (record.py)
    0000000008.log   segments, written in order; every open starts a new one
    sent             "<seq> <offset>": everything before it was accepted by the webhook
    lock             flock'd by the one Outbox using the directory

Guarantees:
- `append` returns only once its records are fdatasync'd (and a new segment's directory
  entry fsync'd). Appends that arrive while a write is running form the next batch:
  one write and one fdatasync serve them all; batches are capped (records and bytes).
- At least once: the sender reads the oldest unsent records (`read`) and, once the
  webhook has accepted them, `mark_sent` moves the durable cursor past them. A crash in
  between sends them again, so every event carries an `event_id` for the receiver to
  drop duplicates. Events leave in append order.
- Recovery: a torn tail (a write a crash cut short) and damaged lines are skipped.
- Bounded: at most `max_bytes` of segments. To make room, whole segments are dropped
  oldest first, sent or not (counted in smtpbalancer_events_dropped_total, logged at
  ERROR): delivering mail never waits for the webhook.
- Fully sent segments are removed.

The event loop owns the index (a deque of segments with record counts) and never
touches the disk; every disk operation runs on the outbox's own thread, one at a time,
so the writer, the reader and the reclaimer never race.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from smtpbalancer import metrics
from smtpbalancer.clock import Clock
from smtpbalancer.events import record, segments
from smtpbalancer.tasks import spawn

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_MAX_BYTES: Final = 1 << 30
_MAX_BATCH_RECORDS: Final = 4096
_MAX_BATCH_BYTES: Final = 1 << 20
_DROP_LOG_EVERY_S: Final = 10.0


class OutboxError(Exception):
    """The outbox could not make events durable, or read them."""

    def __init__(self, operation: str, errno: int | None = None) -> None:
        super().__init__(f"{operation} failed (errno={errno})")
        self.operation = operation
        self.errno = errno


@dataclass(frozen=True, slots=True)
class Batch:
    """Records read for one POST: the JSON documents and where they lie on disk."""

    seq: int
    start: int
    end: int
    docs: tuple[bytes, ...]


@dataclass(slots=True)
class _Segment:
    seq: int
    end: int  # acknowledged bytes (whole lines)
    records: int  # good records in [0, end)
    sent_to: int = 0  # first unsent byte; only the oldest segment moves it
    sent: int = 0  # good records before sent_to


@dataclass(slots=True)
class _Append:
    lines: list[bytes]
    size: int
    done: asyncio.Future[None]


class Outbox:
    def __init__(
        self,
        directory: Path,
        clock: Clock,
        *,
        name: str = "events",
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        self._clock = clock
        self._max_bytes = max_bytes
        # Dropping works a segment at a time: keep segments small next to the bound.
        self._segment_bytes = segment_bytes or max(4096, min(4 << 20, max_bytes // 16))
        self._metrics = metrics.EventMetrics(name)
        self._segments: deque[_Segment] = deque()
        self._open_seq: int | None = None  # the segment the appender writes to
        self._appender: segments.Appender | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock_fd: int | None = None
        self._queue: deque[_Append] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._grew = asyncio.Event()
        self.dropped = 0
        self._logged_drop: tuple[float, int] | None = None  # (when, self.dropped then)

    def __repr__(self) -> str:
        return (
            f"<Outbox {self.name} pending={self.pending} segments={len(self._segments)}"
            f" bytes={self.disk_bytes} open={self._open_seq} queued={len(self._queue)}"
            f" dropped={self.dropped}>"
        )

    @property
    def pending(self) -> int:
        """Events appended and not yet marked sent."""
        return sum(s.records - s.sent for s in self._segments)

    @property
    def disk_bytes(self) -> int:
        return sum(s.end for s in self._segments)

    # --- lifecycle (blocking) -----------------------------------------------------------

    def open(self) -> None:
        """Create the directory, take its lock and index what is unsent. Blocking.
        Raises OutboxError if the directory cannot be used or another Outbox holds it."""
        try:
            segments.make_dirs(self.directory)
            fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise OutboxError(f"open outbox {self.directory}", exc.errno) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutboxError(f"lock outbox {self.directory}", errno.EBUSY) from None
        try:
            next_seq = self._recover()
        except OSError as exc:
            os.close(fd)
            raise OutboxError(f"recover outbox {self.directory}", exc.errno) from None
        self._lock_fd = fd
        self._appender = segments.Appender(self.directory, self._segment_bytes, next_seq)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"outbox-{self.name}")
        self._metrics.pending.set(self.pending)
        log.info(
            "events.outbox_opened outbox=%s pending=%d segments=%d bytes=%d",
            self.name,
            self.pending,
            len(self._segments),
            self.disk_bytes,
        )

    def _recover(self) -> int:
        segments.remove_leftovers(self.directory)
        c_seq, c_off = segments.read_cursor(self.directory) or (0, 0)
        found = segments.sequences(self.directory)
        gone = [seq for seq in found if seq < c_seq]
        for seq in (s for s in found if s >= c_seq):
            sent_to = c_off if seq == c_seq else 0
            scan = segments.scan(segments.log_path(self.directory, seq), sent_to)
            if scan.torn:
                log.warning(
                    "events.torn_tail outbox=%s segment=%d bytes=%d", self.name, seq, scan.torn
                )
            if scan.damaged:
                log.error(
                    "events.damaged outbox=%s segment=%d lines=%d", self.name, seq, scan.damaged
                )
            if scan.records == scan.sent:
                gone.append(seq)
                continue
            seg = _Segment(seq, scan.end, scan.records, min(sent_to, scan.end), scan.sent)
            self._segments.append(seg)
        segments.unlink(self.directory, gone)
        return max([*found, c_seq]) + 1  # never reuse a name the cursor may point to

    async def drain(self) -> None:
        """Wait until every append issued so far has finished."""
        while self._flusher is not None:
            await asyncio.wait({self._flusher})

    def close(self) -> None:
        """Finish the running disk job, close the open segment, release the lock.
        Blocking; call after `drain()`, once nothing appends any more."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._appender is not None:
            self._appender.close()
            self._appender = None
            last = self._segments[-1] if self._segments else None
            if last is not None and last.seq == self._open_seq and last.sent_to >= last.end:
                segments.unlink(self.directory, [last.seq])  # all sent: leave nothing behind
        self._open_seq = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _in_thread(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._executor is None:
            raise OutboxError(f"outbox {self.name} closed", errno.EBADF)
        try:
            job = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError:  # shut down meanwhile
            raise OutboxError(f"outbox {self.name} closed", errno.EBADF) from None
        return await job

    # --- appending ----------------------------------------------------------------------

    async def append(self, docs: Sequence[Mapping[str, object]]) -> None:
        """Durably append events (each gets an `event_id` unless it has one); returns
        once they are fdatasync'd. Raises OutboxError, after which none was appended.
        An event that cannot be encoded (not JSON, over 1 MiB) is dropped and counted."""
        if self._executor is None:
            raise OutboxError(f"outbox {self.name} closed", errno.EBADF)
        lines = []
        for doc in docs:
            try:
                lines.append(record.encode(doc))
            except ValueError as exc:
                self.count_dropped(1)
                log.error("events.refused outbox=%s reason=%s", self.name, exc)
        if not lines:
            return
        item = _Append(lines, sum(map(len, lines)), asyncio.get_running_loop().create_future())
        self._queue.append(item)
        if self._flusher is None:
            self._flusher = spawn(self._flush(), name=f"outbox-flush:{self.name}")
        # Shielded: one caller giving up must not cancel the write for the others.
        await asyncio.shield(item.done)

    async def _flush(self) -> None:
        items: list[_Append] = []
        try:
            while self._queue:
                items = self._take()
                lines = [line for item in items for line in item.lines]
                rotate, dropped = self._make_room(sum(item.size for item in items))
                try:
                    written = await self._in_thread(self._write, lines, rotate, dropped)
                except (OSError, OutboxError) as exc:
                    self._open_seq = None  # the appender abandoned its segment
                    err = exc if isinstance(exc, OutboxError) else OutboxError("append", exc.errno)
                    log.error(
                        "events.append_failed outbox=%s events=%d errno=%s",
                        self.name,
                        len(lines),
                        err.errno,
                    )
                    _settle(items, err)
                    continue
                self._index(written, len(lines))
                _settle(items, None)
            items = []
        finally:
            self._flusher = None
            _settle([*items, *self._queue], OutboxError(f"outbox {self.name} stopped"))
            self._queue.clear()

    def _take(self) -> list[_Append]:
        items = [self._queue.popleft()]
        count, size = len(items[0].lines), items[0].size
        while self._queue:
            nxt = self._queue[0]
            if count + len(nxt.lines) > _MAX_BATCH_RECORDS or size + nxt.size > _MAX_BATCH_BYTES:
                break
            items.append(self._queue.popleft())
            count, size = count + len(nxt.lines), size + nxt.size
        return items

    def _write(self, lines: list[bytes], rotate: bool, dropped: list[int]) -> segments.Appended:
        assert self._appender is not None
        if rotate:
            self._appender.close()
        segments.unlink(self.directory, dropped)  # room first: the disk may be full
        return self._appender.append(lines)

    def _index(self, written: segments.Appended, count: int) -> None:
        last = self._segments[-1] if self._segments else None
        if last is not None and last.seq == written.seq:
            last.end = written.end
            last.records += count
        else:
            self._segments.append(_Segment(written.seq, written.end, count))
        self._open_seq = written.seq
        self._metrics.pending.set(self.pending)
        self._grew.set()

    def _make_room(self, need: int) -> tuple[bool, list[int]]:
        """Drop the oldest segments until `need` more bytes fit; whether the open
        segment went too (the appender must start a new one), and what to unlink."""
        rotate, dropped = False, []
        total = self.disk_bytes
        while self._segments and total + need > self._max_bytes:
            seg = self._segments.popleft()
            total -= seg.end
            dropped.append(seg.seq)
            if seg.seq == self._open_seq:
                rotate, self._open_seq = True, None
            self.count_dropped(seg.records - seg.sent)
        if dropped:
            self._log_dropped()
            self._metrics.pending.set(self.pending)
        return rotate, dropped

    def count_dropped(self, n: int) -> None:
        """Count events lost unsent (also for callers whose append failed)."""
        self.dropped += n
        self._metrics.dropped.inc(n)

    def _log_dropped(self) -> None:
        # One line per interval however small the segments: the counter has the detail.
        now = self._clock.monotonic()
        if self._logged_drop is not None and now - self._logged_drop[0] < _DROP_LOG_EVERY_S:
            return
        since = self.dropped - (self._logged_drop[1] if self._logged_drop else 0)
        self._logged_drop = (now, self.dropped)
        log.error(
            "events.dropped outbox=%s events=%d total=%d reason=full max_bytes=%d",
            self.name,
            since,
            self.dropped,
            self._max_bytes,
        )

    # --- the sender's side --------------------------------------------------------------

    async def wait_pending(self, count: int = 1) -> None:
        """Wait until at least `count` events are unsent."""
        while self.pending < count:
            self._grew.clear()
            await self._grew.wait()

    async def read(self, limit: int, *, max_bytes: int = 4 << 20) -> Batch | None:
        """The oldest unsent events, up to `limit` records and about `max_bytes` of JSON,
        from one segment; None when nothing is unsent. Raises OutboxError."""
        while True:
            await self._reclaim()
            if not self._segments or self._segments[0].sent_to >= self._segments[0].end:
                return None
            head = self._segments[0]
            seq, start, end = head.seq, head.sent_to, head.end
            path = segments.log_path(self.directory, seq)
            try:
                parsed = await self._in_thread(segments.read, path, start, end, limit, max_bytes)
            except FileNotFoundError:
                parsed = None  # dropped meanwhile, or removed behind our back
            except OSError as exc:
                raise OutboxError("read outbox", exc.errno) from None
            if not self._segments or self._segments[0] is not head or head.sent_to != start:
                continue  # dropped while we read
            if parsed is None:
                self._segments.popleft()
                self.count_dropped(head.records - head.sent)
                log.error("events.segment_missing outbox=%s segment=%d", self.name, seq)
                continue
            if parsed.damaged:
                log.error(
                    "events.damaged outbox=%s segment=%d lines=%d", self.name, seq, parsed.damaged
                )
            if parsed.docs:
                return Batch(seq, start, start + parsed.end, tuple(parsed.docs))
            head.sent_to = start + parsed.end  # only damaged lines: nothing to send

    async def mark_sent(self, batch: Batch) -> None:
        """The webhook accepted `batch`: durably move the cursor past it and remove the
        segments left with nothing unsent. A failure to persist is logged, not raised
        (the events would only be sent again after a restart)."""
        self._metrics.sent.inc(len(batch.docs))
        head = self._segments[0] if self._segments else None
        if head is None or head.seq != batch.seq or head.sent_to != batch.start:
            return  # its segment was dropped while the batch was out
        head.sent_to = batch.end
        head.sent += len(batch.docs)
        self._metrics.pending.set(self.pending)
        gone = self._reclaimable()
        try:
            await self._in_thread(self._persist, head.seq, head.sent_to, gone)
        except (OSError, OutboxError) as exc:
            log.error("events.cursor_failed outbox=%s errno=%s", self.name, exc.errno)

    def _persist(self, seq: int, offset: int, gone: list[int]) -> None:
        segments.write_cursor(self.directory, seq, offset)
        segments.unlink(self.directory, gone)  # only once the cursor is past them

    def _reclaimable(self) -> list[int]:
        gone = []
        while (
            self._segments
            and self._segments[0].sent_to >= self._segments[0].end
            and self._segments[0].seq != self._open_seq
        ):
            gone.append(self._segments.popleft().seq)
        return gone

    async def _reclaim(self) -> None:
        gone = self._reclaimable()
        if gone:
            try:
                await self._in_thread(segments.unlink, self.directory, gone)
            except OSError as exc:
                log.error("events.reclaim_failed outbox=%s errno=%s", self.name, exc.errno)


def _settle(items: list[_Append], error: OutboxError | None) -> None:
    for item in items:
        if item.done.done():
            continue
        if error is None:
            item.done.set_result(None)
        else:
            item.done.set_exception(error)
            item.done.exception()  # retrieved: the waiters re-raise it themselves
