"""Segment files of the spool's message log: names, scanning, done marks, body reads.

    segments/<seq>.log    records (record.py's SMTPB1 format) appended back to back;
                          <seq> is a zero-padded decimal, so names sort in write order
    segments/<seq>.done   finished records of that segment, one line each: a queue id,
                          or "@<offset>" for a damaged record already copied to quarantine/

A segment is only ever appended to by the process holding the spool lock, and only
in the run that created it (every start opens a new one), so whatever follows the
last whole record of a segment was never acknowledged: a torn tail.

`scan` frames records from their header lines and checks each metadata checksum; it
reads no bodies (those are checked when loaded for delivery), so a scan costs one
pread per MiB of small records and one per large record. A record whose metadata is
damaged but whose header frames it, and whose successor (or the end of file) is where
the frame says, is reported as damaged and the scan goes on; anything it cannot frame
ends the scan: all zeros or a cut-off header or record is a torn tail, anything else
is a corrupt tail for quarantine. The scan never searches forward for the next
"SMTPB1" (a body may contain one that a client crafted).

Reading here has no side effects; recovery.py decides what to truncate, quarantine or
delete, and queue_admin.py reads a running instance's segments with the same code.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple

from smtpbalancer import durable
from smtpbalancer.durable import fsync_dir, pread_all
from smtpbalancer.envelope import valid_queue_id
from smtpbalancer.errors import SpoolCorrupt
from smtpbalancer.spool import record
from smtpbalancer.spool.record import MessageMeta

LOG_SUFFIX: Final = ".log"
DONE_SUFFIX: Final = ".done"
_CHUNK: Final = 1 << 20  # scan read size: ~700 records of 1 KiB per pread
_HEAD_WINDOW: Final = 4096  # header line and metadata of all but the largest envelopes


def name_of(seq: int) -> str:
    return f"{seq:010d}"


def path_label(seq: int) -> str:
    return f"{name_of(seq)}{LOG_SUFFIX}"


def log_path(directory: Path, seq: int) -> Path:
    return directory / f"{name_of(seq)}{LOG_SUFFIX}"


def done_path(directory: Path, seq: int) -> Path:
    return directory / f"{name_of(seq)}{DONE_SUFFIX}"


def sequences(directory: Path, suffix: str = LOG_SUFFIX) -> list[int]:
    """Sequence numbers of the segment files (or done files) in `directory`, in order."""
    return durable.sequences(directory, suffix)


# --- done marks -----------------------------------------------------------------------


@dataclass(slots=True)
class DoneMarks:
    ids: set[str] = field(default_factory=set)
    offsets: set[int] = field(default_factory=set)


def read_done(path: Path) -> DoneMarks:
    """The marks in a .done file (none if it is missing). Lines a crash tore are ignored:
    a torn line never reads as another valid id, so the worst case is a redelivery."""
    marks = DoneMarks()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return marks
    for raw in data.split(b"\n"):
        line = raw.decode("ascii", "replace")
        if valid_queue_id(line):
            marks.ids.add(line)
        elif line.startswith("@") and line[1:].isdigit() and line[1:].isascii():
            marks.offsets.add(int(line[1:]))
    return marks


def append_done(path: Path, lines: Iterable[str], *, durable: bool) -> None:
    """Append marks. `durable` fsyncs them (and the directory if the file is new):
    an operator's delete must not come back; a delivered message may (dup-ok)."""
    payload = "".join(f"{line}\n" for line in lines).encode("ascii")
    created = durable and not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, payload)  # a few KiB at most: one write, O_APPEND keeps lines whole
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


# --- scanning ---------------------------------------------------------------------------


class Tail(enum.StrEnum):
    CLEAN = "clean"  # the last record ends at the end of the file
    TORN = "torn"  # a record cut short (or zeros): a write a crash interrupted
    CORRUPT = "corrupt"  # bytes that frame no record: quarantine them


class Found(NamedTuple):  # a tuple: recovery makes one per queued message
    meta: MessageMeta
    offset: int
    head_len: int  # header line + metadata: the body starts at offset + head_len


@dataclass(frozen=True, slots=True)
class Damaged:
    offset: int
    length: int
    why: str


@dataclass(slots=True)
class SegmentScan:
    seq: int
    size: int
    found: list[Found] = field(default_factory=list)  # live records (unless `keep` took them)
    finished: int = 0  # records marked done (or damaged ones already set aside)
    damaged: list[Damaged] = field(default_factory=list)
    end: int = 0  # where the framed records stop
    tail: Tail = Tail.CLEAN
    why: str = ""  # for a corrupt tail


class _Reader:
    """pread in large chunks; the small reads are served from the last chunk."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size
        self._buf = b""
        self._start = 0

    def view(self, pos: int, n: int) -> tuple[bytes, int]:
        """A buffer holding the bytes at [pos, pos + n) (fewer at the end of the file),
        and where they start in it: no copy when they are in the current chunk."""
        end = min(pos + n, self.size)
        if self._start <= pos and end <= self._start + len(self._buf):
            return self._buf, pos - self._start
        self._buf = pread_all(self._fd, max(end - pos, _CHUNK), pos)
        self._start = pos
        return self._buf, 0

    def read(self, pos: int, n: int) -> bytes:
        buf, at = self.view(pos, n)
        return buf[at : at + n]


# Called with each live record instead of listing it in `found`: its queue id and arrival
# time, its frame, offset and metadata bytes (checksum verified; the JSON only peeked at,
# see record.peek_meta, and left to `record.decode_checked_meta`).
Keep = Callable[[str, float, record.Frame, int, bytes], None]


def scan(path: Path, seq: int, done: DoneMarks, keep: Keep | None = None) -> SegmentScan:
    """Frame every record of one segment file. Raises FileNotFoundError if it is gone."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        reader = _Reader(fd, os.fstat(fd).st_size)
        return _scan(reader, SegmentScan(seq, reader.size), done, keep)
    finally:
        os.close(fd)


def _scan(reader: _Reader, result: SegmentScan, done: DoneMarks, keep: Keep | None) -> SegmentScan:
    pos, size = 0, reader.size
    name = path_label(result.seq)
    found, done_ids = result.found, done.ids
    while pos < size:
        buf, at = reader.view(pos, _HEAD_WINDOW)
        frame = record.parse_frame(buf, at)
        if frame is None:
            return _stop(reader, result, pos, "bad header line")
        end = pos + frame.total
        if len(buf) - at < frame.head_len:  # a large envelope: read it whole
            buf, at = reader.view(pos, frame.head_len)
            if len(buf) - at < frame.head_len:  # cannot be checked: the frame may be the damage
                return _stop(reader, result, pos, "metadata cut short")
        meta_bytes = buf[at + frame.line_len : at + frame.head_len]
        meta: MessageMeta | None = None
        try:
            if keep is None:
                meta = record.decode_meta(name, frame, meta_bytes, expect_id=False)
                queue_id, received = meta.queue_id, meta.received_wall
            else:
                queue_id, received = record.peek_meta(name, frame, meta_bytes)
        except SpoolCorrupt as exc:
            if end <= size and pos in done.offsets:
                result.finished += 1
            elif end <= size and _frames_at(reader, end, name):
                result.damaged.append(Damaged(pos, frame.total, exc.why))
            else:
                return _stop(reader, result, pos, exc.why)
            pos = end
            continue
        if end > size:  # a checked frame, body cut short: the write a crash interrupted
            return _stop(reader, result, pos, "", torn=True)
        if queue_id in done_ids:
            result.finished += 1
        elif meta is None:
            assert keep is not None
            keep(queue_id, received, frame, pos, meta_bytes)
        else:
            found.append(Found(meta, pos, frame.head_len))
        pos = end
    result.end = pos
    return result


def _frames_at(reader: _Reader, pos: int, name: str) -> bool:
    """Whether a record with a good metadata checksum starts at `pos` (or the file ends)."""
    if pos == reader.size:
        return True
    buf, at = reader.view(pos, record.MAX_HEADER_LINE)
    frame = record.parse_frame(buf, at)
    if frame is None:
        return False
    meta_bytes = reader.read(pos + frame.line_len, frame.meta_len)
    try:
        record.decode_meta(name, frame, meta_bytes, expect_id=False)
    except SpoolCorrupt:
        return False
    return True


def _stop(
    reader: _Reader, result: SegmentScan, pos: int, why: str, *, torn: bool = False
) -> SegmentScan:
    result.end = pos
    if torn or _looks_torn(reader, pos):
        result.tail = Tail.TORN
    else:
        result.tail, result.why = Tail.CORRUPT, why
    return result


def _looks_torn(reader: _Reader, pos: int) -> bool:
    """A crash leaves a cut-off header line, or zeros where the file grew but the data
    never reached the disk."""
    if record.maybe_torn_header(reader.read(pos, record.MAX_HEADER_LINE)):
        return True
    while pos < reader.size:
        chunk = reader.read(pos, _CHUNK)
        if chunk.count(0) != len(chunk):
            return False
        pos += len(chunk)
    return True


# --- reading and copying records --------------------------------------------------------


def read_body(path: Path, meta: MessageMeta, body_offset: int) -> bytes:
    """The body of a record, checked against its metadata. Raises SpoolCorrupt, OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        body = pread_all(fd, meta.body_size, body_offset)
    finally:
        os.close(fd)
    record.check_body(meta.queue_id, meta, body)
    return body


def read_record(path: Path, queue_id: str, offset: int, length: int) -> tuple[MessageMeta, bytes]:
    """The metadata and body of the record of `queue_id` at `offset`, both checked, in one
    read (a queued message keeps neither in memory). Raises SpoolCorrupt, OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = pread_all(fd, length, offset)
    finally:
        os.close(fd)
    layout = record.decode_message_head(queue_id, data, expect_id=False)
    meta = layout.meta
    if meta.queue_id != queue_id or layout.file_size != len(data):
        raise SpoolCorrupt(queue_id, "record does not match the index")
    body = data[layout.body_offset :]
    record.check_body(queue_id, meta, body)
    return meta, body


def read_meta(path: Path, queue_id: str, offset: int, head_len: int) -> MessageMeta:
    """The metadata of the record of `queue_id` at `offset`. Raises SpoolCorrupt, OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = pread_all(fd, head_len, offset)
    finally:
        os.close(fd)
    meta = record.decode_message_head(queue_id, head, expect_id=False).meta
    if meta.queue_id != queue_id:
        raise SpoolCorrupt(queue_id, "record does not match the index")
    return meta


def read_spans(path: Path, spans: list[tuple[int, int]]) -> list[bytes]:
    """The raw bytes at each (offset, length) of a segment (compaction copies them)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return [pread_all(fd, length, offset) for offset, length in spans]
    finally:
        os.close(fd)


def copy_out(path: Path, offset: int, length: int | None, dest: Path) -> None:
    """Copy bytes of a segment (to its end if `length` is None) into a new file, durably."""
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        todo = size - offset if length is None else length
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            while todo > 0:
                chunk = os.pread(src, min(todo, _CHUNK), offset)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
                offset += len(chunk)
                todo -= len(chunk)
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(src)
    fsync_dir(dest.parent)
