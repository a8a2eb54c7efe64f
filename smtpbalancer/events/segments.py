"""The files of one outbox directory: segment logs and the durable "sent up to" cursor.

    <seq>.log   records (record.py) back to back; <seq> is 10 zero-padded digits, so
                names sort in write order. Only the run that created a segment appends
                to it (every open starts a new one), so whatever follows its last whole
                line was never acknowledged: a torn tail, ignored.
    sent        "<seq> <offset>\\n": every record before this position has been accepted
                by the webhook. Replaced atomically (sent.tmp, fsync, rename, fsync of
                the directory). A segment older than <seq>, or missing, holds nothing
                unsent; segments after it are unsent from their start.
    lock        flock'd by the one Outbox that owns the directory.

Blocking functions, run on the outbox's own thread (outbox.py); `Appender` is
confined to that thread. Errors surface as OSError; outbox.py translates them.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from smtpbalancer import durable
from smtpbalancer.durable import fsync_dir, pread_all
from smtpbalancer.events import record

LOG_SUFFIX: Final = ".log"
CURSOR: Final = "sent"
_CURSOR_TMP: Final = "sent.tmp"
_CHUNK: Final = 1 << 20
_MAX_LINE: Final = record.MAX_RECORD_BYTES + 64


def log_path(directory: Path, seq: int) -> Path:
    return directory / f"{seq:010d}{LOG_SUFFIX}"


def sequences(directory: Path) -> list[int]:
    """Sequence numbers of the segment files in `directory`, in order."""
    return durable.sequences(directory, LOG_SUFFIX)


def make_dirs(directory: Path) -> None:
    """Create `directory` and any missing parents durably: each new entry is fsync'd
    in its parent, or a crash could lose the directory with every segment in it."""
    missing = []
    at = directory
    while not at.exists():
        missing.append(at)
        at = at.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
        fsync_dir(path.parent)


# --- the cursor -----------------------------------------------------------------------


def read_cursor(directory: Path) -> tuple[int, int] | None:
    """The durable (seq, offset) of the first unsent record; None if there is none yet
    or it cannot be read (then everything on disk counts as unsent: duplicates, no loss)."""
    try:
        text = (directory / CURSOR).read_text("ascii")
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    parts = text.split()
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def write_cursor(directory: Path, seq: int, offset: int) -> None:
    tmp = directory / _CURSOR_TMP
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{seq} {offset}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / CURSOR)
    fsync_dir(directory)


def remove_leftovers(directory: Path) -> None:
    (directory / _CURSOR_TMP).unlink(missing_ok=True)


def unlink(directory: Path, seqs: list[int]) -> None:
    """Remove segments; no directory fsync: a segment that comes back after a crash is
    behind the cursor (reclaimed again) or was dropped (resent: a duplicate, not a loss)."""
    for seq in seqs:
        log_path(directory, seq).unlink(missing_ok=True)


# --- scanning and reading --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scan:
    end: int  # just past the last whole line: a torn tail starts here
    records: int  # good records in the segment
    sent: int  # good records before the cursor offset
    damaged: int  # lines with a bad checksum, skipped
    torn: int  # bytes of the torn tail


def scan(path: Path, sent_to: int) -> Scan:
    """Frame every record of a segment; `sent_to` is the cursor offset inside it (0 if
    the cursor is elsewhere). Raises FileNotFoundError if the segment is gone."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pos = end = records = sent = damaged = 0  # pos: the file offset of buf[0]
        buf = b""
        while chunk := os.pread(fd, _CHUNK, pos + len(buf)):
            buf += chunk
            parsed = record.parse(buf, count_only=True)
            records += len(parsed.starts)
            sent += sum(1 for s in parsed.starts if pos + s < sent_to)
            damaged += parsed.damaged
            if parsed.end:
                pos, buf = pos + parsed.end, buf[parsed.end :]
                end = pos
            elif len(buf) > _MAX_LINE:
                # No newline in more than a record's worth: junk. Forget its head; the
                # rest up to the next newline then reads as one damaged line.
                pos, buf = pos + len(buf), b""
        return Scan(end, records, sent, damaged, size - end)
    finally:
        os.close(fd)


def read(path: Path, start: int, end: int, limit: int, max_bytes: int) -> record.Parsed:
    """Up to `limit` records (and about `max_bytes` of JSON) from `start`, not past
    `end` (the acknowledged size). Offsets in the result are relative to `start`."""
    want = min(end - start, max(max_bytes + 64, _MAX_LINE))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = pread_all(fd, want, start)
    finally:
        os.close(fd)
    parsed = record.parse(buf, limit=limit, max_bytes=max_bytes)
    if parsed.end == 0 and buf:
        # `end` is always on a line boundary, so a buffer without a newline is part of
        # an over-long damaged line (scan skipped it the same way): step over it.
        parsed.end, parsed.damaged = len(buf), 1
    return parsed


# --- appending --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int  # the segment the batch went to
    start: int  # where the batch begins in it
    end: int  # the segment's acknowledged size after the batch


class Appender:
    """The one writer of an outbox: a batch of lines, one write, one fdatasync.

    A new segment is created (O_EXCL) and the directory fsync'd before any record in
    it is acknowledged. A failed write or fdatasync fails the whole batch: the file is
    cut back to where the batch began (best effort) and abandoned, so the next batch
    starts a fresh segment; a segment that never got an acknowledged record is removed.
    """

    def __init__(self, directory: Path, segment_bytes: int, next_seq: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.seq: int | None = None  # the open segment
        self.size = 0
        self._next_seq = next_seq
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"<Appender seq={self.seq} size={self.size} next={self._next_seq}>"

    def append(self, lines: list[bytes], *, rotate: bool = False) -> Appended:
        if self._fd is not None and (rotate or self.size >= self.segment_bytes):
            self.close()
        if self._fd is None:
            self._open_next()
        assert self._fd is not None and self.seq is not None
        data = b"".join(lines)
        start = self.size
        try:
            _pwrite_all(self._fd, data, start)
            os.fdatasync(self._fd)
        except OSError:
            self._abandon(start)
            raise
        self.size = start + len(data)
        return Appended(self.seq, start, self.size)

    def close(self) -> None:
        """Stop appending to the open segment (an empty one is removed)."""
        if self._fd is None or self.seq is None:
            return
        os.close(self._fd)
        if self.size == 0:
            log_path(self.directory, self.seq).unlink(missing_ok=True)
        self._fd, self.seq, self.size = None, None, 0

    def _open_next(self) -> None:
        for _ in range(100):  # a leftover name (should not happen) is skipped, never reused
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            path = log_path(self.directory, seq)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            try:
                fsync_dir(self.directory)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            self._fd, self.seq, self.size = fd, seq, 0
            return
        raise OSError(errno.EEXIST, "no free segment name")

    def _abandon(self, start: int) -> None:
        # After a failed fdatasync the kernel may have dropped the dirty pages and
        # reports the error once: the file cannot be trusted for further writes.
        assert self._fd is not None
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, start)
        self.size = start
        self.close()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[written:]
        offset += written
