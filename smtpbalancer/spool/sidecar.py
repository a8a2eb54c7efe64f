"""Small per-message files in queue/, next to the segment log: .state, .hold, legacy.

    queue/<QUEUE-ID>.state    settled recipients (record.py's SMTPS1), replaced atomically
    queue/<QUEUE-ID>.hold     empty marker: an operator held the message
    queue/<QUEUE-ID>          a whole message file from a spool written before segments
    queue/.tmp-*              a file being written; recovery deletes them

They are rare (a .state only once some recipients are settled), so each is its own
file: written to a temp file, fsync'd, renamed into place, and made durable by a
directory fsync that concurrent writers share (DirSync). Blocking functions here
run on the spool's thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Final

from smtpbalancer.durable import fsync_dir
from smtpbalancer.errors import SpoolCorrupt, SpoolError
from smtpbalancer.spool import record
from smtpbalancer.spool.record import MessageMeta
from smtpbalancer.tasks import spawn

STATE_SUFFIX: Final = ".state"
HOLD_SUFFIX: Final = ".hold"
TMP_PREFIX: Final = ".tmp-"


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
    """Group commit for directory fsyncs (.state files and hold markers).

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


def touch(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))


def read_file_body(path: Path, meta: MessageMeta) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(record.head_size(meta.queue_id, fh.read(record.MAX_HEADER_LINE + 1)))
        body = fh.read()
    record.check_body(meta.queue_id, meta, body)
    return body


def read_file_record(path: Path, queue_id: str) -> tuple[MessageMeta, bytes]:
    """The metadata and body of a legacy message file, both checked."""
    with open(path, "rb") as fh:
        data = fh.read()
    layout = record.decode_message_head(queue_id, data)
    if layout.file_size != len(data):
        raise SpoolCorrupt(queue_id, "size does not match the header")
    body = data[layout.body_offset :]
    record.check_body(queue_id, layout.meta, body)
    return layout.meta, body


def unlink_legacy(queue_dir: Path, queue_id: str) -> None:
    (queue_dir / f"{queue_id}{STATE_SUFFIX}").unlink(missing_ok=True)
    (queue_dir / queue_id).unlink(missing_ok=True)


def unlink_sidecars(queue_dir: Path, queue_id: str) -> None:
    (queue_dir / f"{queue_id}{STATE_SUFFIX}").unlink(missing_ok=True)
    (queue_dir / f"{queue_id}{HOLD_SUFFIX}").unlink(missing_ok=True)
