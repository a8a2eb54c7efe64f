"""Durable spool store: one file per message, fsync'd before anyone says 250.

Layout under the spool directory:
    queue/<QUEUE-ID>          message file (see record.py)
    queue/<QUEUE-ID>.state    settled recipients, once any are settled
    queue/<QUEUE-ID>.hold     empty marker: an operator held it (`smtpbalancer queue hold`);
                              recovery counts it but it is not delivered until released
    queue/.tmp-*              being written; recovery deletes them
    quarantine/               corrupt entries moved aside, never delivered
    lock                      flock'd by the one process that owns the spool

Write recipe (invariant 1): write to a .tmp- file, fsync it, rename into place,
then fsync the directory. Concurrent stores share directory fsyncs (DirSync),
so N sessions finishing together pay for one directory flush, not N.
Disk work runs on a bounded thread pool, one call per message; the event loop
never blocks on the disk. A failed write or fsync raises SpoolError and leaves
nothing behind that could be delivered (no retried fsync: after a failure the
kernel may have dropped the dirty pages).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from smtpbalancer.clock import Clock
from smtpbalancer.envelope import Envelope, QueueIds
from smtpbalancer.errors import SpoolError
from smtpbalancer.spool import record
from smtpbalancer.spool.record import MessageMeta, Progress
from smtpbalancer.tasks import spawn

log = logging.getLogger(__name__)

STATE_SUFFIX = ".state"
HOLD_SUFFIX = ".hold"
TMP_PREFIX = ".tmp-"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, chunks: tuple[bytes, ...]) -> None:
    """Write `chunks` to a temp file beside `path`, fsync it, rename it into place.

    Leaves either no file, the complete new file, or (after a crash) a .tmp- file
    that recovery deletes. The caller still owes a directory fsync.
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class DirSync:
    """Group commit for directory fsyncs.

    A caller that renamed a file asks for a sync that *starts after* its rename;
    all callers that arrive while one sync runs share the next one.
    """

    def __init__(self, directory: Path, run: Any) -> None:
        self._directory = directory
        self._run_in_thread = run
        self._next: asyncio.Future[None] | None = None
        self._running = False

    async def sync(self) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        fut = self._next
        if not self._running:
            self._running = True
            spawn(self._loop(), name="spool-dirsync")
        await asyncio.shield(fut)

    async def _loop(self) -> None:
        try:
            while self._next is not None:
                fut, self._next = self._next, None
                try:
                    await self._run_in_thread(fsync_dir, self._directory)
                except OSError as exc:
                    fut.set_exception(SpoolError("fsync directory", exc.errno))
                    fut.exception()  # retrieved: waiters re-raise their own copy
                else:
                    fut.set_result(None)
        finally:
            self._running = False


class SpoolStore:
    """Durable store, load, update and removal of spooled messages, with accounting."""

    def __init__(self, directory: Path, clock: Clock, *, threads: int = 16) -> None:
        self.directory = directory
        self.queue_dir = directory / "queue"
        self.quarantine_dir = directory / "quarantine"
        self._clock = clock
        self._ids = QueueIds()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spool")
        # Removals get their own thread: queued behind fsyncs they would lag, and every
        # delivered-but-not-yet-removed message is a duplicate after a crash.
        self._remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-rm")
        self._dirsync = DirSync(self.queue_dir, self._in_thread)
        self._lock_fd: int | None = None
        self.messages = 0
        self.bytes = 0
        # Arrival time per queue id, in arrival order (queue ids are time-ordered and
        # recovery adopts them sorted), so the oldest is the first key.
        self._arrivals: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<SpoolStore {self.directory} messages={self.messages} bytes={self.bytes}>"

    def open(self) -> None:
        """Create the layout and take the exclusive lock. Raises SpoolError if busy."""
        try:
            self.queue_dir.mkdir(parents=True, exist_ok=True)
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
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

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._remover.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def adopt(self, meta: MessageMeta) -> None:
        """Count a message found by recovery."""
        self.messages += 1
        self.bytes += meta.body_size
        self._arrivals[meta.queue_id] = meta.received_wall

    def oldest_arrival(self) -> float | None:
        """Wall time the oldest spooled message arrived, or None when the spool is empty."""
        try:
            first = next(iter(self._arrivals), None)
            return None if first is None else self._arrivals.get(first)
        except RuntimeError:  # read from the metrics thread while the loop mutated the dict
            return None

    async def store(
        self, envelope: Envelope, body: bytes, client: str = "", queue_id: str = ""
    ) -> MessageMeta:
        """Make a message durable. Returns only once file and directory entry are on disk."""
        wall = self._clock.wall()
        queue_id = queue_id or self._ids.next(wall)
        meta = MessageMeta(queue_id, envelope, wall, len(body), client)
        prefix, crc = record.encode_message(meta, body)
        path = self.queue_dir / queue_id
        try:
            await self._in_thread(write_file, path, (prefix, body))
        except OSError as exc:
            raise SpoolError("write message", exc.errno) from None
        try:
            await self._dirsync.sync()
        except SpoolError:
            # The client gets 451 and will retry: take the entry back so that this
            # copy is never delivered too (best effort; a leftover means a duplicate).
            await self._in_thread(_unlink_pair, self.queue_dir, queue_id)
            raise
        self.messages += 1
        self.bytes += len(body)
        self._arrivals[queue_id] = wall
        return MessageMeta(queue_id, envelope, wall, len(body), client, crc)

    async def load_body(self, meta: MessageMeta) -> bytes:
        """Read and verify a spooled body. Raises SpoolCorrupt or OSError."""
        data: bytes = await self._in_thread(_read_body, self.queue_dir / meta.queue_id, meta)
        return data

    async def save_progress(self, queue_id: str, progress: Progress) -> None:
        """Durably record settled recipients (atomic replace + directory fsync)."""
        path = self.queue_dir / f"{queue_id}{STATE_SUFFIX}"
        try:
            await self._in_thread(write_file, path, (record.encode_progress(progress),))
        except OSError as exc:
            raise SpoolError("write progress", exc.errno) from None
        await self._dirsync.sync()

    async def remove(self, meta: MessageMeta) -> None:
        """Forget a finished message. A lost unlink after a crash means redelivery (dup-ok)."""
        await asyncio.get_running_loop().run_in_executor(
            self._remover, _unlink_pair, self.queue_dir, meta.queue_id
        )
        self.forget(meta)

    def forget(self, meta: MessageMeta) -> None:
        """Stop counting a message (delivered, quarantined, or its file vanished)."""
        self.messages -= 1
        self.bytes -= meta.body_size
        self._arrivals.pop(meta.queue_id, None)

    async def quarantine(self, meta: MessageMeta, why: str) -> None:
        log.error("spool.quarantine queue_id=%s reason=%s", meta.queue_id, why)
        await self._in_thread(self.quarantine_now, meta.queue_id)
        self.forget(meta)

    def quarantine_now(self, name: str) -> None:
        """Move a file (and its state file) into quarantine/. Blocking: startup or thread."""
        for suffix in ("", STATE_SUFFIX):
            src = self.queue_dir / f"{name}{suffix}"
            if src.exists():
                os.replace(src, self.quarantine_dir / f"{name}{suffix}")
        fsync_dir(self.quarantine_dir)
        fsync_dir(self.queue_dir)


def _read_body(path: Path, meta: MessageMeta) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(record.head_size(meta.queue_id, fh.read(record.MAX_HEADER_LINE + 1)))
        body = fh.read()
    record.check_body(meta.queue_id, meta, body)
    return body


def _unlink_pair(queue_dir: Path, queue_id: str) -> None:
    (queue_dir / f"{queue_id}{STATE_SUFFIX}").unlink(missing_ok=True)
    (queue_dir / queue_id).unlink(missing_ok=True)
