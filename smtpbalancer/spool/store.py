"""Durable spool store: a group-committed segment log, and 250 only after fdatasync.

Layout under the spool directory:
    segments/<seq>.log        message records back to back (record.py; see segment.py)
    segments/<seq>.done       finished records of that segment, one queue id a line
    queue/<QUEUE-ID>.state    settled recipients, once any are settled
    queue/<QUEUE-ID>.hold     empty marker: an operator held it; recovery counts it but
                              it is not delivered until released
    queue/<QUEUE-ID>          a message file of a spool written before segments: read,
                              delivered and removed as before, never written any more
    queue/.tmp-*              a .state being written; recovery deletes them
    quarantine/               corrupt entries copied aside, never delivered
    lock                      flock'd by the one process that owns the spool

Write recipe (invariant 1): `store` encodes the record on the loop and hands it to
the commit batcher; the records of concurrent stores go out in one pwritev and one
fdatasync (batch.py, writer.py), and each store returns only after the fdatasync of
its batch, and for a new segment after the fsync of the segments directory. A failed
write or fdatasync fails the whole batch (SpoolError: 451) and none of its records is
ever delivered (writer.py). A batch runs on the event loop at the end of a turn while
fdatasync is fast (a median under COMMIT_ON_LOOP_UNDER_S), on the commit thread
otherwise, one batch at a time either way: no locks, and a disk that turns slow blocks
the loop for a few batches at most.

Completion: `remove` appends the queue id to the segment's .done file without an
fsync (a lost mark only means a redelivery after a crash, which at-least-once allows)
and unlinks the message's .state/.hold if it has them; `remove_soon` does the same
without waiting for it (the dispatcher's way). A plain mark is written on the
loop, one write per segment per loop turn (marks.py); sidecar and legacy-file unlinks,
their marks, and reclaims run batched on the cleanup thread. What then happens to
segments is occupancy.py's call: one with nothing live left is unlinked with its marks
(on the cleanup thread, after `MarkAppender.retire` wrote its last buffered marks and
closed its fd); a sparse one is compacted; a drained open segment is replaced.

Compaction copies the live records of a sparse segment forward: the raw records go
through the same commit path (one fdatasync per batch), and only after that batch is
durable does the index point at the copy and the old copy get its done mark. After a
crash in between both copies may be unmarked: recovery keeps the older one (its
segment was never written again, while the newer copy's batch may not have been
synced), and the relocation simply happens again.

The index (queue id -> segment, offset, sizes, arrival) is memory only; recovery.py
rebuilds it. It holds no envelope: a queued message costs a few small objects, and
`load` reads its metadata back with its body (one pread) when it is delivered.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

from smtpbalancer.clock import Clock
from smtpbalancer.durable import fsync_dir
from smtpbalancer.envelope import Envelope, QueueIds
from smtpbalancer.errors import SpoolCorrupt, SpoolError
from smtpbalancer.spool import record, segment
from smtpbalancer.spool.batch import Batcher
from smtpbalancer.spool.marks import MarkAppender
from smtpbalancer.spool.occupancy import Action, Occupancy
from smtpbalancer.spool.record import MessageMeta, Progress
from smtpbalancer.spool.sidecar import (
    HOLD_SUFFIX,
    STATE_SUFFIX,
    DirSync,
    read_file_body,
    read_file_record,
    touch,
    unlink_legacy,
    unlink_sidecars,
    write_file,
)
from smtpbalancer.spool.writer import SegmentWriter
from smtpbalancer.tasks import spawn

log = logging.getLogger(__name__)

LEGACY: Final = -1  # Slot.seq of a one-file message in queue/
ROTATE_BYTES: Final = 64 * 1024 * 1024
IDLE_ROTATE_BYTES: Final = 1024 * 1024
COMPACT_BELOW: Final = 0.25  # of a segment's size still live
COMPACT_CHUNK_BYTES: Final = 1024 * 1024  # per relocation batch: stores wait behind it
BATCH_RECORDS: Final = 256  # two iovecs each, under IOV_MAX
BATCH_BYTES: Final = 8 * 1024 * 1024
# Commits run on the event loop while their typical duration (write + fdatasync) stays
# under this, on the commit thread otherwise (see batch.py); None: always on the thread.
COMMIT_ON_LOOP_UNDER_S: Final = 0.005
CLOSE_WAIT_S: Final = 5.0
_T = TypeVar("_T")


class Slot(NamedTuple):  # a tuple: one per queued message, made 100k times at a restart
    """Where a live message is: segment `seq` at `offset` (LEGACY: its own file), and what
    the accounting needs without reading it."""

    seq: int
    offset: int
    head_len: int
    body_size: int
    received_wall: float

    @property
    def length(self) -> int:
        return self.head_len + self.body_size


class _Pending(NamedTuple):  # one per store: a tuple is the cheapest record to build
    queue_id: str
    received_wall: float
    prefix: bytes
    body: bytes
    moved_from: int | None = None  # compaction: the segment of the copy this replaces


class _Cleanup(NamedTuple):
    """Work after a message is finished: its mark, its files, maybe its segment. The
    cleanup thread does it, but for a plain mark (the common case: marks.py)."""

    queue_id: str
    seq: int
    mark: bool = True  # append queue_id to the segment's .done
    sidecars: bool = False  # unlink queue/<id>.state and .hold
    reclaim: int | None = None  # unlink this segment and its marks

    @property
    def plain(self) -> bool:
        """Only a segment mark: written on the loop (marks.py), not by the thread."""
        return self.mark and self.seq != LEGACY and not self.sidecars and self.reclaim is None


class SpoolStore:
    """Durable store, load, update and removal of spooled messages, with accounting."""

    def __init__(
        self,
        directory: Path,
        clock: Clock,
        *,
        threads: int = 16,
        rotate_bytes: int = ROTATE_BYTES,
        commit_on_loop_under_s: float | None = COMMIT_ON_LOOP_UNDER_S,
    ) -> None:
        self.directory = directory
        self.queue_dir = directory / "queue"
        self.quarantine_dir = directory / "quarantine"
        self.segments_dir = directory / "segments"
        self._clock = clock
        self._ids = QueueIds()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spool")
        self._writer = SegmentWriter(self.segments_dir, rotate_bytes)
        self._commits: Batcher[_Pending, tuple[int, list[int]]] = Batcher(
            "spool-commit",
            self._commit,
            size=lambda p: len(p.prefix) + len(p.body),
            max_items=BATCH_RECORDS,
            max_bytes=BATCH_BYTES,
            settle=self._settle,
            eager=True,
            on_loop_under_s=commit_on_loop_under_s,
            clock=clock,
        )
        # Cleanups get their own thread: queued behind fdatasyncs they would lag, and every
        # delivered-but-unmarked message is a duplicate after a crash.
        self._cleanups: Batcher[_Cleanup, None] = Batcher(
            "spool-cleanup", self._clean, size=lambda _: 1, max_items=4096, max_bytes=4096
        )
        self._marks = MarkAppender(self.segments_dir)
        self._dirsync = DirSync(self.queue_dir, self._in_thread)
        self._lock_fd: int | None = None
        self.messages = 0
        self.bytes = 0
        # Live messages in arrival order (queue ids are time-ordered and recovery adopts
        # them sorted), so the oldest is the first key.
        self._index: dict[str, Slot] = {}
        self._occupancy = Occupancy(
            compact_below=COMPACT_BELOW,
            compact_min_bytes=IDLE_ROTATE_BYTES,
            idle_rotate_bytes=IDLE_ROTATE_BYTES,
        )
        # Rotation asked for (on the loop) and done (where the batch runs: the commit thread,
        # or the loop): counts, not one flag both sides write, so that no request is lost
        # while a batch is being taken.
        self._rotations_asked = 0
        self._rotations_done = 0
        self._sidecars: set[str] = set()  # ids that have a .state or .hold file
        self._sparse: dict[int, None] = {}  # segments waiting for compaction, in order
        self._compacting = False
        self._closing = False
        self.relocated = 0

    def __repr__(self) -> str:
        return (
            f"<SpoolStore {self.directory} messages={self.messages} bytes={self.bytes}"
            f" segments={len(self._occupancy)} active={self._occupancy.active}"
            f" relocated={self.relocated}>"
        )

    # --- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Create the layout and take the exclusive lock. Raises SpoolError if busy."""
        try:
            for d in (self.queue_dir, self.quarantine_dir, self.segments_dir):
                d.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"open spool {self.directory}", exc.errno) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolError(
                f"lock spool {self.directory} (another instance?)", errno.EBUSY
            ) from None
        self._lock_fd = fd
        found = segment.sequences(self.segments_dir) + segment.sequences(
            self.segments_dir, segment.DONE_SUFFIX
        )
        self._writer.start_after(max(found, default=0))  # every run writes a new segment

    def close(self) -> None:
        """Finish the batches, leave the open segment, release the lock (blocking).

        Called in a thread (as the app does) it first lets the loop run what is still
        queued: the last done marks and reclaims, so a drained spool is left empty.
        """
        self._closing = True
        if _on_a_loop():
            self._marks.flush()
        else:
            self._commits.wait_idle(CLOSE_WAIT_S)  # its settle may post marks and reclaims
            self._marks.wait_idle(CLOSE_WAIT_S)
            self._cleanups.wait_idle(CLOSE_WAIT_S)
        self._commits.close()
        self._marks.close()  # before the open segment's .done may be unlinked below
        self._cleanups.close()
        self._pool.shutdown(wait=True)
        if self._lock_fd is None:  # a read-only view never changes the spool
            return
        active = self._writer.seq
        self._writer.close()
        if active is not None and self._occupancy.live(active) == 0:
            _unlink_segment(self.segments_dir, active)
        os.close(self._lock_fd)
        self._lock_fd = None

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # --- accounting ----------------------------------------------------------------------

    def adopt(
        self,
        meta: MessageMeta,
        seq: int = LEGACY,
        offset: int = 0,
        head_len: int = 0,
        *,
        sidecars: bool = False,
    ) -> None:
        """Count a message found by recovery (LEGACY: a file in queue/)."""
        slot = Slot(seq, offset, head_len, meta.body_size, meta.received_wall)
        self.adopt_slot(meta.queue_id, slot, sidecars=sidecars)

    def adopt_slot(self, queue_id: str, slot: Slot, *, sidecars: bool = False) -> None:
        """`adopt`, for a record recovery located without keeping its metadata."""
        self._index[queue_id] = slot
        self.messages += 1
        self.bytes += slot.body_size
        if slot.seq != LEGACY:
            self._occupancy.add(slot.seq, slot.offset, slot.length)
        if sidecars:
            self._sidecars.add(queue_id)

    def adopt_segment(self, seq: int, size: int) -> None:
        """Recovery, after adopting a segment's live records: its size. A sparse one is
        compacted once the store runs (the first store or removal starts it)."""
        if self._occupancy.sized(seq, size) is Action.COMPACT:
            self._sparse[seq] = None

    def oldest_arrival(self) -> float | None:
        """Wall time the oldest spooled message arrived, or None when the spool is empty."""
        try:
            first = next(iter(self._index.values()), None)
        except RuntimeError:  # read from the metrics thread while the loop mutated the dict
            return None
        return None if first is None else first.received_wall

    def location(self, queue_id: str) -> Slot | None:
        return self._index.get(queue_id)

    def queue_ids(self) -> set[str]:
        return set(self._index)

    def forget(self, queue_id: str) -> None:
        """Stop counting a message (quarantined, or its file vanished). Idempotent."""
        slot = self._index.pop(queue_id, None)
        if slot is not None:
            self.messages -= 1
            self.bytes -= slot.body_size
            self._post(self._release(queue_id, slot, mark=False))

    def _release(self, queue_id: str, slot: Slot, *, mark: bool) -> _Cleanup:
        """A copy of a message stops being live (finished, or moved): occupancy's verdict
        and the cleanup thread's work for it."""
        # Once per finished message: positional tuples, no call that has nothing to do.
        seq = slot.seq
        sidecars = False
        if queue_id in self._sidecars and queue_id not in self._index:  # the message is gone
            sidecars = True
            self._sidecars.discard(queue_id)
        if seq == LEGACY:
            return _Cleanup(queue_id, seq, mark, sidecars)
        action = self._occupancy.remove(seq, slot.head_len + slot.body_size)
        if action is Action.NONE:
            if self._sparse:  # recovery left segments to compact: a removal starts it
                self._compact_later()
            return _Cleanup(queue_id, seq, mark, sidecars)
        if action is Action.ROTATE:
            self._rotations_asked += 1
        self._compact_later(seq if action is Action.COMPACT else None)
        reclaim = None
        if action is Action.RECLAIM:
            self._marks.retire(seq)  # before the thread may unlink its .done
            reclaim = seq
        return _Cleanup(queue_id, seq, mark, sidecars, reclaim)

    # --- the write path ----------------------------------------------------------------

    async def store(
        self, envelope: Envelope, body: bytes, client: str = "", queue_id: str = ""
    ) -> MessageMeta:
        """Make a message durable. Returns only once its batch is fdatasync'd."""
        meta, pending = self._pending(envelope, body, client, queue_id)
        await self._commits.queue(pending)
        return meta

    def store_then(
        self,
        envelope: Envelope,
        body: bytes,
        client: str,
        queue_id: str,
        done: Callable[[MessageMeta, SpoolError | None], None],
    ) -> None:
        """`store` for a caller that wants no task: `done(meta, None)` is called on the
        loop once the message is durable, in the turn its batch completes, or
        `done(meta, error)` if it could not be made durable."""
        meta, pending = self._pending(envelope, body, client, queue_id)

        def stored(error: Exception | None) -> None:
            assert error is None or isinstance(error, SpoolError)  # the batcher's only kind
            done(meta, error)

        self._commits.then(pending, stored)

    def _pending(
        self, envelope: Envelope, body: bytes, client: str, queue_id: str
    ) -> tuple[MessageMeta, _Pending]:
        wall = self._clock.wall()
        queue_id = queue_id or self._ids.next(wall)
        meta = MessageMeta(queue_id, envelope, wall, len(body), client, zlib.crc32(body))
        prefix = record.encode_prefix(meta, meta.body_size, meta.body_crc)
        return meta, _Pending(queue_id, wall, prefix, body)

    def _commit(self, batch: list[_Pending]) -> tuple[int, list[int]]:
        # Where the batch runs (the loop or the commit thread, one batch at a time): a
        # rotation asked for since the last batch applies to this one.
        asked = self._rotations_asked
        rotate = asked != self._rotations_done
        self._rotations_done = asked
        return self._writer.append([(p.queue_id, p.prefix, p.body) for p in batch], rotate=rotate)

    def _settle(self, batch: list[_Pending], outcome: tuple[int, list[int]] | Exception) -> None:
        # On the loop, between batches: the writer is idle, its seq is stable.
        if not isinstance(outcome, Exception):
            seq, offsets = outcome
            index, occupancy = self._index, self._occupancy
            for pending, offset in zip(batch, offsets, strict=True):
                size = len(pending.body)
                head_len = len(pending.prefix)
                slot = Slot(seq, offset, head_len, size, pending.received_wall)
                if pending.moved_from is not None:
                    self._moved(pending.queue_id, slot, pending.moved_from)
                    continue
                index[pending.queue_id] = slot
                occupancy.add(seq, offset, head_len + size)
                self.messages += 1
                self.bytes += size
        left, action = self._occupancy.switch(self._writer.seq)
        if left is not None and action is Action.RECLAIM:
            self._marks.retire(left)  # before the thread may unlink its .done
            self._cleanups.post(_Cleanup("", left, mark=False, reclaim=left))
        self._compact_later(left if action is Action.COMPACT else None)

    def _moved(self, queue_id: str, copy: Slot, moved_from: int) -> None:
        """A relocated copy is durable: point the index at it and mark the old copy done."""
        old = self._index.get(queue_id)
        if old is None or old.seq != moved_from:  # finished meanwhile: the copy is dead
            self._post(_Cleanup(queue_id, copy.seq))
            return
        self._index[queue_id] = copy  # same key: the arrival order is kept
        self._occupancy.add(copy.seq, copy.offset, copy.length)
        self._post(self._release(queue_id, old, mark=True))
        self.relocated += 1

    # --- compaction ----------------------------------------------------------------------

    def _compact_later(self, seq: int | None = None) -> None:
        if seq is not None:
            self._sparse[seq] = None
        if self._sparse and not self._compacting:
            self._compacting = True
            spawn(self._compact(), name="spool-compact")

    async def _compact(self) -> None:
        try:
            while self._sparse:
                seq = next(iter(self._sparse))
                del self._sparse[seq]
                moved = await self._relocate(seq)
                log.info("spool.compacted segment=%s records=%d", seq, moved)
        except Exception as exc:  # retried when the segment next loses a record
            log.warning("spool.compact_failed error=%r", exc)
            self._sparse.clear()
        finally:
            self._compacting = False

    async def _relocate(self, seq: int) -> int:
        """Copy the live records of segment `seq` into the open segment, in small batches."""
        path = segment.log_path(self.segments_dir, seq)
        slots = [(qid, s) for qid, s in self._index.items() if s.seq == seq]
        moved = 0
        while slots and not self._closing:
            chunk: list[tuple[str, Slot]] = []
            size = 0
            while slots and (not chunk or size + slots[-1][1].length <= COMPACT_CHUNK_BYTES):
                chunk.append(slots.pop())
                size += chunk[-1][1].length
            chunk = [(qid, s) for qid, s in chunk if self._index.get(qid) is s]
            if not chunk:
                continue
            spans = [(s.offset, s.length) for _, s in chunk]
            raws = await self._in_thread(segment.read_spans, path, spans)
            await asyncio.gather(
                *(
                    self._commits.submit(
                        _Pending(qid, s.received_wall, raw[: s.head_len], raw[s.head_len :], seq)
                    )
                    for (qid, s), raw in zip(chunk, raws, strict=True)
                )
            )
            moved += len(chunk)
        return moved

    # --- reading and finishing ---------------------------------------------------------

    async def load_body(self, meta: MessageMeta) -> bytes:
        """Read and verify a spooled body. Raises SpoolCorrupt or OSError (FileNotFoundError
        once the message is gone)."""
        for _ in range(3):
            slot = self._index.get(meta.queue_id)
            if slot is None:
                break
            if slot.seq == LEGACY:
                return await self._in_thread(read_file_body, self.queue_dir / meta.queue_id, meta)
            path = segment.log_path(self.segments_dir, slot.seq)
            try:
                return await self._in_thread(
                    segment.read_body, path, meta, slot.offset + slot.head_len
                )
            except FileNotFoundError:
                if self._index.get(meta.queue_id) is slot:
                    raise
                # compacted while we read: the segment we looked in is gone, try the copy
        raise FileNotFoundError(errno.ENOENT, "not in the spool", meta.queue_id)

    async def load(self, queue_id: str) -> tuple[MessageMeta, bytes]:
        """Read and verify a spooled message's metadata and body, in one read. Raises
        SpoolCorrupt or OSError (FileNotFoundError once the message is gone)."""
        for _ in range(3):
            slot = self._index.get(queue_id)
            if slot is None:
                break
            if slot.seq == LEGACY:
                return await self._in_thread(read_file_record, self.queue_dir / queue_id, queue_id)
            path = segment.log_path(self.segments_dir, slot.seq)
            try:
                return await self._in_thread(
                    segment.read_record, path, queue_id, slot.offset, slot.length
                )
            except FileNotFoundError:
                if self._index.get(queue_id) is slot:
                    raise
                # compacted while we read: the segment we looked in is gone, try the copy
        raise FileNotFoundError(errno.ENOENT, "not in the spool", queue_id)

    async def save_progress(self, queue_id: str, progress: Progress) -> None:
        """Durably record settled recipients (atomic replace + directory fsync)."""
        path = self.queue_dir / f"{queue_id}{STATE_SUFFIX}"
        self._sidecars.add(queue_id)
        try:
            await self._in_thread(write_file, path, (record.encode_progress(progress),))
        except OSError as exc:
            raise SpoolError("write progress", exc.errno) from None
        await self._dirsync.sync()

    async def remove(self, meta: MessageMeta) -> None:
        """Finish a message: mark it done. A mark lost in a crash means redelivery (dup-ok)."""
        slot = self._index.pop(meta.queue_id, None)
        if slot is not None:
            self.messages -= 1
            self.bytes -= slot.body_size
            await self._finish(self._release(meta.queue_id, slot, mark=True))

    def remove_soon(self, meta: MessageMeta) -> None:
        """`remove` without waiting for the mark: it is written with this loop turn's marks
        (its cleanup thread's work, if any, is queued). The wait bought nothing a crash
        would respect: the mark is not fsync'd either way, so a crash before or after it
        is written means a redelivery at worst (dup-ok)."""
        slot = self._index.pop(meta.queue_id, None)
        if slot is not None:
            self.messages -= 1
            self.bytes -= slot.body_size
            self._post(self._release(meta.queue_id, slot, mark=True))

    async def _finish(self, cleanup: _Cleanup) -> None:
        # Every cleanup goes through here or _post: a plain mark to the loop's appender.
        if cleanup.plain:
            await self._marks.append(cleanup.seq, cleanup.queue_id)
        else:
            await self._cleanups.submit(cleanup)

    def _post(self, cleanup: _Cleanup) -> None:
        queue_id, seq, mark, sidecars, reclaim = cleanup
        if mark and seq != LEGACY and not sidecars and reclaim is None:  # cleanup.plain, inline
            self._marks.post(seq, queue_id)
        else:
            self._cleanups.post(cleanup)

    def _clean(self, batch: list[_Cleanup]) -> None:
        # The cleanup thread. Never raises: a failure here costs a redelivery, not a loss.
        marks: dict[int, list[str]] = {}
        reclaim = {c.reclaim for c in batch if c.reclaim is not None}
        for c in batch:
            if c.mark and c.seq != LEGACY and c.seq not in reclaim:
                marks.setdefault(c.seq, []).append(c.queue_id)
        for seq, ids in marks.items():
            try:
                segment.append_done(segment.done_path(self.segments_dir, seq), ids, durable=False)
            except OSError as exc:
                log.error("spool.done_mark_failed segment=%s errno=%s", seq, exc.errno)
        for c in batch:
            try:
                if c.mark and c.seq == LEGACY:
                    unlink_legacy(self.queue_dir, c.queue_id)
                if c.sidecars:
                    unlink_sidecars(self.queue_dir, c.queue_id)
            except OSError as exc:
                log.error("spool.unlink_failed queue_id=%s errno=%s", c.queue_id, exc.errno)
        for seq in sorted(reclaim):
            try:
                _unlink_segment(self.segments_dir, seq)
            except OSError as exc:
                log.error("spool.reclaim_failed segment=%s errno=%s", seq, exc.errno)

    async def quarantine(self, meta: MessageMeta, why: str) -> None:
        """Copy a message that failed validation into quarantine/, then finish it."""
        await self.quarantine_id(meta.queue_id, why)

    async def quarantine_id(self, queue_id: str, why: str) -> None:
        """`quarantine` for a message whose metadata could not be read."""
        log.error("spool.quarantine queue_id=%s reason=%s", queue_id, why)
        slot = self._index.get(queue_id)
        if slot is None:
            return
        if slot.seq == LEGACY:
            await self._in_thread(self.quarantine_now, queue_id)
        else:
            await self._in_thread(self._quarantine_record, queue_id, slot)
        slot = self._index.pop(queue_id, None)
        if slot is not None:
            self.messages -= 1
            self.bytes -= slot.body_size
            await self._finish(self._release(queue_id, slot, mark=True))

    def quarantine_now(self, name: str) -> None:
        """Move a legacy file (and its state file) into quarantine/. Blocking."""
        for suffix in ("", STATE_SUFFIX):
            src = self.queue_dir / f"{name}{suffix}"
            if src.exists():
                os.replace(src, self.quarantine_dir / f"{name}{suffix}")
        fsync_dir(self.quarantine_dir)
        fsync_dir(self.queue_dir)

    def _quarantine_record(self, queue_id: str, slot: Slot) -> None:
        path = segment.log_path(self.segments_dir, slot.seq)
        segment.copy_out(path, slot.offset, slot.length, self.quarantine_dir / queue_id)
        state = self.queue_dir / f"{queue_id}{STATE_SUFFIX}"
        if state.exists():
            os.replace(state, self.quarantine_dir / state.name)
            fsync_dir(self.quarantine_dir)

    # --- operator actions on a running instance ----------------------------------------

    async def hold(self, queue_id: str) -> bool:
        """Durably mark a message held (it survives a restart). False if unknown."""
        if queue_id not in self._index:
            return False
        self._sidecars.add(queue_id)
        try:
            await self._in_thread(touch, self.queue_dir / f"{queue_id}{HOLD_SUFFIX}")
        except OSError as exc:
            raise SpoolError("write hold marker", exc.errno) from None
        await self._dirsync.sync()
        return True

    async def release(self, queue_id: str) -> bool:
        """Durably remove a message's hold marker. False if unknown."""
        if queue_id not in self._index:
            return False
        marker = self.queue_dir / f"{queue_id}{HOLD_SUFFIX}"
        try:
            await self._in_thread(marker.unlink, True)
        except OSError as exc:
            raise SpoolError("remove hold marker", exc.errno) from None
        await self._dirsync.sync()
        return True

    async def delete(self, queue_id: str) -> MessageMeta | None:
        """Finish a message for good, durably (no DSN). Returns its metadata: None if it
        is unknown, or if its record can no longer be read (it is deleted all the same)."""
        slot = self._index.get(queue_id)
        if slot is None:
            return None
        meta = await self._in_thread(self._read_meta, queue_id, slot)
        while slot is not None:  # compaction may move it while the mark is written
            try:
                await self._in_thread(finish_durably, self.directory, slot.seq, queue_id)
            except OSError as exc:
                raise SpoolError("delete message", exc.errno) from None
            current = self._index.get(queue_id)
            if current is None or current.seq == slot.seq:
                break
            slot = current
        current = self._index.pop(queue_id, None)
        if current is not None:  # not finished by the dispatcher meanwhile
            self.messages -= 1
            self.bytes -= current.body_size
            self._post(self._release(queue_id, current, mark=False))
        return meta

    def _read_meta(self, queue_id: str, slot: Slot) -> MessageMeta | None:
        """The metadata of a live message, read back (the index does not keep it). Blocking."""
        try:
            if slot.seq == LEGACY:
                with open(self.queue_dir / queue_id, "rb") as fh:
                    head = fh.read()
                return record.decode_message_head(queue_id, head).meta
            path = segment.log_path(self.segments_dir, slot.seq)
            return segment.read_meta(path, queue_id, slot.offset, slot.head_len)
        except (SpoolCorrupt, OSError):
            return None


def _on_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def finish_durably(directory: Path, seq: int, queue_id: str) -> None:
    """An operator's delete: a done mark fsync'd (or the legacy file unlinked and the
    directory fsync'd), then the .state/.hold files. Blocking."""
    queue_dir = directory / "queue"
    if seq == LEGACY:
        unlink_legacy(queue_dir, queue_id)
        fsync_dir(queue_dir)
    else:
        segment.append_done(
            segment.done_path(directory / "segments", seq), [queue_id], durable=True
        )
    unlink_sidecars(queue_dir, queue_id)


def _unlink_segment(segments_dir: Path, seq: int) -> None:
    # The log before its marks: a crash in between leaves lone marks, which recovery
    # deletes; the other order could leave a log whose finished records come back.
    segment.log_path(segments_dir, seq).unlink(missing_ok=True)
    segment.done_path(segments_dir, seq).unlink(missing_ok=True)
