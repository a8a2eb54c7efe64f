"""Spool record formats: versioned, checksummed, pure.

A message record is one header line, the envelope metadata (JSON), then the body:

    SMTPB1 <meta_len> <body_len> <meta_crc32 hex> <body_crc32 hex>\\n<meta><body>

It is a whole file in a legacy spool and one entry of a segment log (segment.py)
now. The metadata repeats the body length ("size"), so a record whose metadata
checksum holds has a trustworthy frame: the next record starts right after it.
(Older records have no "size"; their header alone frames them.)

A progress file (written only once some recipients are settled) is:

    SMTPS1 <crc32 hex>\\n<json>

Decoding validates lengths and checksums and raises SpoolCorrupt on any doubt;
a corrupt entry is quarantined, never delivered. No I/O here.
"""

from __future__ import annotations

import json
import math
import re
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, NamedTuple

from smtpbalancer.envelope import DEFAULT_POOL, Envelope
from smtpbalancer.errors import SpoolCorrupt

MESSAGE_MAGIC = b"SMTPB1"
PROGRESS_MAGIC = b"SMTPS1"
MAX_HEADER_LINE = 80
_JSON = json.JSONDecoder()
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_QUOTE = json.encoder.encode_basestring  # a str as a JSON string, ensure_ascii=False (C)


class MessageMeta(NamedTuple):  # a tuple: one per stored message, the cheapest to build
    queue_id: str
    envelope: Envelope
    received_wall: float
    body_size: int
    client: str = ""
    body_crc: int = 0


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one recipient failed for good: what the DSN will say about it."""

    status: str  # RFC 3463, e.g. "5.1.1"
    diagnostic: str  # the upstream's reply line, "" for expiry
    remote_mta: str = ""
    at_wall: float = 0.0


_NO_FAILURES: Final[Mapping[str, Failure]] = MappingProxyType({})


class Progress(NamedTuple):  # a tuple: replaced after every attempt, the cheapest to build
    """Settled recipients of one message. Recipients in neither set are pending."""

    delivered: frozenset[str] = frozenset()
    failed: Mapping[str, Failure] = _NO_FAILURES  # never changed in place: replaced
    attempts: int = 0

    def pending(self, rcpts: tuple[str, ...]) -> tuple[str, ...]:
        if not self.delivered and not self.failed:  # the common case: nothing settled yet
            return rcpts
        return tuple(r for r in rcpts if r not in self.delivered and r not in self.failed)


NO_PROGRESS: Final = Progress()  # shared: progress is replaced, never changed in place


def encode_message(meta: MessageMeta, body: bytes) -> tuple[bytes, int]:
    """The file prefix (header line + metadata) to write before the body, and the body crc."""
    body_crc = zlib.crc32(body)
    return encode_prefix(meta, len(body), body_crc), body_crc


def encode_prefix(meta: MessageMeta, body_len: int, body_crc: int) -> bytes:
    """The header line and metadata of a record whose body has this length and crc.

    The metadata is, byte for byte, json.dumps(doc, ensure_ascii=False,
    separators=(",", ":")) of the dict {"id", "from", "rcpts", "received", "client",
    "smtputf8", "8bit", "size"[, "pool"][, "msgid"][, "tags"]} in that order (recovery's
    _PEEK reads the first keys), assembled here around the encoder's own C quoting of
    each string: JSONEncoder.encode set up a new encoder on every call, which was most of
    the cost of storing a message (tests/unit/test_record.py compares the two).
    """
    env = meta.envelope
    received = meta.received_wall
    parts = [
        '{"id":',
        _QUOTE(meta.queue_id),
        ',"from":',
        _QUOTE(env.mail_from),
        ',"rcpts":[',
        ",".join(map(_QUOTE, env.rcpt_tos)),
        '],"received":',
        repr(received) if math.isfinite(received) else _ENCODE(received),
        ',"client":',
        _QUOTE(meta.client),
        ',"smtputf8":true' if env.smtputf8 else ',"smtputf8":false',
        ',"8bit":true' if env.body_8bit else ',"8bit":false',
        ',"size":',
        repr(body_len),
    ]
    if env.pool != DEFAULT_POOL:  # optional keys: absent in older records
        parts += (',"pool":', _QUOTE(env.pool))
    if env.message_id:
        parts += (',"msgid":', _QUOTE(env.message_id))
    if env.tags:
        tags = ",".join(f"[{_QUOTE(name)},{_QUOTE(value)}]" for name, value in env.tags)
        parts += (',"tags":[', tags, "]")
    parts.append("}")
    meta_bytes = "".join(parts).encode()
    head = b"%s %d %d %08x %08x\n" % (
        MESSAGE_MAGIC,
        len(meta_bytes),
        body_len,
        zlib.crc32(meta_bytes),
        body_crc,
    )
    return head + meta_bytes


@dataclass(frozen=True, slots=True)
class MessageLayout:
    """Where the body sits in a message file."""

    meta: MessageMeta
    body_offset: int
    file_size: int


def head_size(name: str, head: bytes) -> int:
    """Bytes from the start of a message file to the start of its body."""
    line_end = head.find(b"\n", 0, MAX_HEADER_LINE)
    fields = head[:line_end].split(b" ") if line_end > 0 else []
    if len(fields) != 5 or fields[0] != MESSAGE_MAGIC or not fields[1].isdigit():
        raise SpoolCorrupt(name, "bad header line")
    return line_end + 1 + int(fields[1])


# A segment scan frames records with this (no split, no slicing); the digits are bounded
# so that a garbage header cannot claim an absurd length.
_HEADER = re.compile(rb"SMTPB1 (\d{1,12}) (\d{1,12}) ([0-9a-f]{8}) ([0-9a-f]{8})\n")


@dataclass(frozen=True, slots=True)
class Frame:
    """What a record's header line says (not yet checked against the metadata)."""

    line_len: int  # header line including its newline
    meta_len: int
    body_len: int
    meta_crc: int
    body_crc: int

    @property
    def head_len(self) -> int:
        return self.line_len + self.meta_len

    @property
    def total(self) -> int:
        return self.line_len + self.meta_len + self.body_len


def parse_frame(data: bytes, at: int = 0) -> Frame | None:
    """The frame of the record starting at data[at], or None if no whole, well-formed
    header line starts there (too short, or garbage: the caller tells the two apart)."""
    found = _HEADER.match(data, at)
    if found is None:
        return None
    meta_len, body_len, meta_crc, body_crc = found.groups()
    return Frame(
        found.end() - at, int(meta_len), int(body_len), int(meta_crc, 16), int(body_crc, 16)
    )


def maybe_torn_header(data: bytes) -> bool:
    """Whether `data` (which runs to the end of its file) could be the start of a header
    line cut short by a crash: a prefix of "SMTPB1 " followed by header characters."""
    if b"\n" in data or len(data) >= MAX_HEADER_LINE:
        return False
    magic = MESSAGE_MAGIC + b" "
    if len(data) <= len(magic):
        return magic.startswith(data)
    return data.startswith(magic) and all(c in b"0123456789abcdef " for c in data[len(magic) :])


def decode_message_head(name: str, head: bytes, *, expect_id: bool = True) -> MessageLayout:
    """Parse the header line and metadata from the first bytes of a message record.

    `head` must hold at least the header line and the metadata; the body is
    validated later, when it is read for delivery.
    """
    line_end = head.find(b"\n", 0, MAX_HEADER_LINE)
    if line_end < 0:
        raise SpoolCorrupt(name, "no header line")
    fields = head[:line_end].split(b" ")
    if len(fields) != 5 or fields[0] != MESSAGE_MAGIC:
        raise SpoolCorrupt(name, "bad header line")
    try:
        meta_len, body_len = int(fields[1]), int(fields[2])
        meta_crc, body_crc = int(fields[3], 16), int(fields[4], 16)
    except ValueError:
        raise SpoolCorrupt(name, "bad header numbers") from None
    start = line_end + 1
    meta_bytes = head[start : start + meta_len]
    if len(meta_bytes) != meta_len:
        raise SpoolCorrupt(name, "truncated metadata")
    frame = Frame(start, meta_len, body_len, meta_crc, body_crc)
    meta = decode_meta(name, frame, meta_bytes, expect_id=expect_id)
    body_offset = start + meta_len
    return MessageLayout(meta, body_offset, body_offset + body_len)


def decode_meta(name: str, frame: Frame, meta_bytes: bytes, *, expect_id: bool) -> MessageMeta:
    """Check a record's metadata against its frame and decode it. Raises SpoolCorrupt.

    With `expect_id` (a legacy file named after its queue id) the metadata must carry
    `name` as its id; a segment record names itself.
    """
    if zlib.crc32(meta_bytes) != frame.meta_crc:
        raise SpoolCorrupt(name, "metadata checksum mismatch")
    return decode_checked_meta(name, meta_bytes, frame.body_len, frame.body_crc, expect_id)


def decode_checked_meta(
    name: str, meta_bytes: bytes, body_len: int, body_crc: int, expect_id: bool = False
) -> MessageMeta:
    """`decode_meta` for metadata whose checksum was verified already. Raises SpoolCorrupt."""
    try:
        doc = _JSON.decode(meta_bytes.decode())
        # Senders, pools and clients repeat across a queue: one string each, not one per
        # message (interned strings are freed with their last user).
        envelope = Envelope(
            mail_from=sys.intern(str(doc["from"])),
            rcpt_tos=tuple(map(str, doc["rcpts"])),
            smtputf8=bool(doc.get("smtputf8", False)),
            body_8bit=bool(doc.get("8bit", False)),
            pool=sys.intern(str(doc.get("pool", DEFAULT_POOL))),
            message_id=str(doc.get("msgid", "")),
            tags=tuple((str(k), str(v)) for k, v in doc.get("tags", ())),
        )
        meta = MessageMeta(
            queue_id=str(doc["id"]),
            envelope=envelope,
            received_wall=float(doc["received"]),
            body_size=body_len,
            client=sys.intern(str(doc.get("client", ""))),
            body_crc=body_crc,
        )
        size = doc.get("size", body_len)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SpoolCorrupt(name, "bad metadata") from None
    if (expect_id and meta.queue_id != name) or not envelope.rcpt_tos or size != body_len:
        raise SpoolCorrupt(name, "metadata does not match the file")
    return meta


# What encode_prefix writes first, and the arrival time; a quote inside a JSON string is
# always escaped, so `,"received":` cannot match inside a value.
_PEEK = re.compile(rb'\{"id":"([0-9A-F]{20})",.*?,"received":(-?[0-9.eE+]+)[,}]', re.DOTALL)


def peek_meta(name: str, frame: Frame, meta_bytes: bytes) -> tuple[str, float]:
    """A segment record's queue id and arrival time, once its checksum holds. Cheaper
    than `decode_meta`, which may still find the rest bad (a recovery scan decodes it
    later): our own records are read with a pattern, anything else as JSON, checking
    recipients and size too. Raises SpoolCorrupt."""
    if zlib.crc32(meta_bytes) != frame.meta_crc:
        raise SpoolCorrupt(name, "metadata checksum mismatch")
    found = _PEEK.match(meta_bytes)
    if found is not None:
        try:
            return found.group(1).decode(), float(found.group(2))
        except ValueError:
            pass
    try:
        doc = _JSON.decode(meta_bytes.decode())
        queue_id, received = str(doc["id"]), float(doc["received"])
        ok = bool(doc["rcpts"]) and doc.get("size", frame.body_len) == frame.body_len
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SpoolCorrupt(name, "bad metadata") from None
    if not ok:
        raise SpoolCorrupt(name, "metadata does not match the file")
    return queue_id, received


def check_body(name: str, meta: MessageMeta, body: bytes) -> None:
    if len(body) != meta.body_size:
        raise SpoolCorrupt(name, "truncated body")
    if zlib.crc32(body) != meta.body_crc:
        raise SpoolCorrupt(name, "body checksum mismatch")


def encode_progress(progress: Progress) -> bytes:
    doc = {
        "delivered": sorted(progress.delivered),
        "failed": {
            rcpt: [f.status, f.diagnostic, f.remote_mta, f.at_wall]
            for rcpt, f in progress.failed.items()
        },
        "attempts": progress.attempts,
    }
    payload = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    return b"%s %08x\n" % (PROGRESS_MAGIC, zlib.crc32(payload)) + payload


def decode_progress(name: str, data: bytes) -> Progress:
    line_end = data.find(b"\n", 0, MAX_HEADER_LINE)
    fields = data[:line_end].split(b" ") if line_end > 0 else []
    if len(fields) != 2 or fields[0] != PROGRESS_MAGIC:
        raise SpoolCorrupt(name, "bad progress header")
    payload = data[line_end + 1 :]
    try:
        if zlib.crc32(payload) != int(fields[1], 16):
            raise SpoolCorrupt(name, "progress checksum mismatch")
        doc = json.loads(payload)
        failed = {
            str(rcpt): Failure(str(v[0]), str(v[1]), str(v[2]), float(v[3]))
            for rcpt, v in doc["failed"].items()
        }
        return Progress(
            delivered=frozenset(str(r) for r in doc["delivered"]),
            failed=failed,
            attempts=int(doc["attempts"]),
        )
    except (ValueError, KeyError, TypeError, IndexError):
        raise SpoolCorrupt(name, "bad progress data") from None
