"""The one appender of the segment log: a batch of records, one write, one fdatasync.

One caller at a time: the spool's commit batcher calls `append` for one batch at a
time, on the event loop or on its thread (batch.py); the loop reads `seq` and `size`
only between batches.

Recipe for a batch (invariant 1: nobody hears 250 before this returns):
1. no open segment, or it reached `rotate_bytes` (or the store asked to rotate):
   create `<seq>.log` (O_EXCL) and fsync the segments directory, so the new name
   is durable before any record in it is acknowledged;
2. one pwritev of every record at the segment's end;
3. one fdatasync (the file's size is part of what it flushes).

Failures fail the whole batch (the callers answer 451) and none of its records may
ever be delivered:
- the write fails (ENOSPC, EFBIG under RLIMIT_FSIZE, EIO): truncate back to where
  the batch began and fdatasync that; then, if the segment holds earlier records,
  start a fresh one for the next batch (a segment at a size limit would fail again).
  If the truncation cannot be made durable, abandon the segment as below.
- the fdatasync fails (EIO): after a failed fdatasync the kernel may have dropped
  the dirty pages and reports the error once, so the segment cannot be trusted for
  new writes. Truncate back (best effort), append the batch's queue ids to the
  segment's .done file durably (best effort: recovery then skips them even if the
  truncation was lost), and abandon it: the next batch creates a new segment.
A segment that never got an acknowledged record is unlinked when it is left, so
failures leave no files behind; the store reclaims the others once all is done.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from smtpbalancer.durable import fsync_dir
from smtpbalancer.errors import SpoolError
from smtpbalancer.spool import segment

log = logging.getLogger(__name__)

# iovecs per pwritev (IOV_MAX is 1024 on Linux); batch.py caps batches well below.
_IOV_MAX = 1024


class SegmentWriter:
    def __init__(self, directory: Path, rotate_bytes: int) -> None:
        self.directory = directory
        self.rotate_bytes = rotate_bytes
        self.seq: int | None = None  # the open segment, None between segments
        self.size = 0  # bytes acknowledged in the open segment
        self._next_seq = 1
        self._fd: int | None = None
        self._acked = False  # the open segment holds an acknowledged record

    def __repr__(self) -> str:
        return f"<SegmentWriter seq={self.seq} size={self.size} next={self._next_seq}>"

    def start_after(self, seq: int) -> None:
        """Number new segments after `seq` (the highest found on disk at open)."""
        self._next_seq = max(self._next_seq, seq + 1)

    def append(
        self, records: Sequence[tuple[str, bytes, bytes]], *, rotate: bool = False
    ) -> tuple[int, list[int]]:
        """Durably append (queue_id, prefix, body) records; return the segment and the
        offset of each record. Raises SpoolError, after which none of them is live."""
        if self._fd is not None and (rotate or self.size >= self.rotate_bytes):
            self.close()
        if self._fd is None:
            self._open_next()
        assert self._fd is not None and self.seq is not None
        start = self.size
        offsets: list[int] = []
        buffers: list[bytes] = []
        pos = start
        for _, prefix, body in records:
            offsets.append(pos)
            buffers.append(prefix)
            buffers.append(body)
            pos += len(prefix) + len(body)
        try:
            _pwrite_all(self._fd, buffers, start)
        except OSError as exc:
            self._undo_write(start, [r[0] for r in records])
            raise SpoolError("write segment", exc.errno) from None
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._abandon(start, [r[0] for r in records], exc.errno)
            raise SpoolError("fdatasync segment", exc.errno) from None
        self.size = pos
        self._acked = True
        return self.seq, offsets

    def close(self) -> None:
        """Stop appending to the open segment (an empty one is unlinked)."""
        if self._fd is None or self.seq is None:
            return
        os.close(self._fd)
        if not self._acked:
            segment.log_path(self.directory, self.seq).unlink(missing_ok=True)
        self._fd, self.seq, self.size, self._acked = None, None, 0, False

    def _open_next(self) -> None:
        for _ in range(100):  # a leftover name (should not happen) is skipped, not reused
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            path = segment.log_path(self.directory, seq)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise SpoolError("create segment", exc.errno) from None
            try:
                fsync_dir(self.directory)
            except OSError as exc:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise SpoolError("fsync segment directory", exc.errno) from None
            self._fd, self.seq, self.size, self._acked = fd, seq, 0, False
            return
        raise SpoolError("create segment", errno.EEXIST)

    def _undo_write(self, start: int, ids: list[str]) -> None:
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, start)
            os.fdatasync(self._fd)
        except OSError as exc:
            self._abandon(start, ids, exc.errno)
            return
        if start > 0:
            self.close()

    def _abandon(self, start: int, ids: list[str], err: int | None) -> None:
        assert self._fd is not None and self.seq is not None
        seq, acked = self.seq, self._acked
        log.error("spool.segment_abandoned segment=%s errno=%s records=%d", seq, err, len(ids))
        with contextlib.suppress(OSError):  # if it fails, the done marks below still count
            os.ftruncate(self._fd, start)
        done = segment.done_path(self.directory, seq)
        try:
            segment.append_done(done, ids, durable=True)
        except OSError as exc:
            log.error("spool.done_mark_failed segment=%s errno=%s", seq, exc.errno)
        os.close(self._fd)
        self._fd, self.seq, self.size, self._acked = None, None, 0, False
        if not acked:  # nothing in it was ever acknowledged: no file left behind
            segment.log_path(self.directory, seq).unlink(missing_ok=True)
            done.unlink(missing_ok=True)


def _pwrite_all(fd: int, buffers: list[bytes], offset: int) -> None:
    """Write every buffer at `offset` on, with as few pwritev calls as the kernel allows."""
    if len(buffers) <= _IOV_MAX:  # the usual batch: one call writes it all
        written = os.pwritev(fd, buffers, offset)
        if written == sum(map(len, buffers)):
            return
        if written == 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        buffers = _after(buffers, written)
    views = [memoryview(b) for b in buffers if b]
    first = 0
    while first < len(views):
        written = os.pwritev(fd, views[first : first + _IOV_MAX], offset)
        if written == 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


def _after(buffers: list[bytes], written: int) -> list[bytes]:
    """What remains of `buffers` once their first `written` bytes are out."""
    rest: list[bytes] = []
    for b in buffers:
        if written >= len(b):
            written -= len(b)
        else:
            rest.append(b[written:])
            written = 0
    return rest
