"""Spool record formats: versioned, checksummed, pure.

A message file is one header line, the envelope metadata (JSON), then the body:

    SMTPB1 <meta_len> <body_len> <meta_crc32 hex> <body_crc32 hex>\\n<meta><body>

A progress file (written only once some recipients are settled) is:

    SMTPS1 <crc32 hex>\\n<json>

Decoding validates lengths and checksums and raises SpoolCorrupt on any doubt;
a corrupt entry is quarantined, never delivered. No I/O here.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from smtpbalancer.envelope import Envelope
from smtpbalancer.errors import SpoolCorrupt

MESSAGE_MAGIC = b"SMTPB1"
PROGRESS_MAGIC = b"SMTPS1"
MAX_HEADER_LINE = 80


@dataclass(frozen=True, slots=True)
class MessageMeta:
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


@dataclass(frozen=True, slots=True)
class Progress:
    """Settled recipients of one message. Recipients in neither set are pending."""

    delivered: frozenset[str] = frozenset()
    failed: Mapping[str, Failure] = field(default_factory=dict)
    attempts: int = 0

    def pending(self, rcpts: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(r for r in rcpts if r not in self.delivered and r not in self.failed)


def encode_message(meta: MessageMeta, body: bytes) -> tuple[bytes, int]:
    """The file prefix (header line + metadata) to write before the body, and the body crc."""
    env = meta.envelope
    doc = {
        "id": meta.queue_id,
        "from": env.mail_from,
        "rcpts": list(env.rcpt_tos),
        "received": meta.received_wall,
        "client": meta.client,
        "smtputf8": env.smtputf8,
        "8bit": env.body_8bit,
    }
    meta_bytes = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    body_crc = zlib.crc32(body)
    head = b"%s %d %d %08x %08x\n" % (
        MESSAGE_MAGIC,
        len(meta_bytes),
        len(body),
        zlib.crc32(meta_bytes),
        body_crc,
    )
    return head + meta_bytes, body_crc


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


def decode_message_head(name: str, head: bytes) -> MessageLayout:
    """Parse the header line and metadata from the first bytes of a message file.

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
    if zlib.crc32(meta_bytes) != meta_crc:
        raise SpoolCorrupt(name, "metadata checksum mismatch")
    try:
        doc = json.loads(meta_bytes)
        envelope = Envelope(
            mail_from=str(doc["from"]),
            rcpt_tos=tuple(str(r) for r in doc["rcpts"]),
            smtputf8=bool(doc.get("smtputf8", False)),
            body_8bit=bool(doc.get("8bit", False)),
        )
        meta = MessageMeta(
            queue_id=str(doc["id"]),
            envelope=envelope,
            received_wall=float(doc["received"]),
            body_size=body_len,
            client=str(doc.get("client", "")),
            body_crc=body_crc,
        )
    except (ValueError, KeyError, TypeError):
        raise SpoolCorrupt(name, "bad metadata") from None
    if meta.queue_id != name or not envelope.rcpt_tos:
        raise SpoolCorrupt(name, "metadata does not match the file")
    body_offset = start + meta_len
    return MessageLayout(meta, body_offset, body_offset + body_len)


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
