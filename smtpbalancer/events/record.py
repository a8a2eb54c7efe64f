"""One outbox record: a JSON event on one line, with a checksum. Pure, no I/O.

    <crc32 of the JSON, 8 lowercase hex> <JSON document>\n

The JSON never holds a raw newline (json.dumps escapes control characters), so a
record is exactly one line and a reader frames records by newlines alone. A line
without its newline is a write a crash cut short (a torn tail); a line whose checksum
does not match (zeros where data never reached the disk, bit rot) is damaged. Both are
skipped, never sent. The JSON is kept as bytes from end to end: the webhook sender
splices the documents into its request body without parsing them again.
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

MAX_RECORD_BYTES: Final = 1 << 20  # a larger event (an absurd reply text) is refused
_PREFIX: Final = 9  # "xxxxxxxx "


def event_id() -> str:
    """A unique id for an event, so the receiver can drop the duplicates that
    at-least-once delivery allows (a batch resent after a crash or a lost 2xx)."""
    return str(uuid.uuid4())


def encode(doc: Mapping[str, object]) -> bytes:
    """The record line for `doc`, with an `event_id` first unless it already has one.
    Raises ValueError if the document is not JSON-serialisable or too large."""
    if "event_id" not in doc:
        doc = {"event_id": event_id(), **doc}
    try:
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"event is not JSON: {exc}") from None
    if len(body) > MAX_RECORD_BYTES:
        raise ValueError(f"event too large: {len(body)} bytes")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode(line: bytes) -> bytes | None:
    """The JSON of a whole record line (newline excluded), or None if it is damaged."""
    if len(line) <= _PREFIX or line[8:9] != b" ":
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    body = line[_PREFIX:]
    return body if zlib.crc32(body) == crc else None


@dataclass(slots=True)
class Parsed:
    """Records framed from a buffer that starts on a record boundary."""

    docs: list[bytes] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # offset of each doc's line in the buffer
    end: int = 0  # just past the last whole line taken (damaged lines included)
    damaged: int = 0


def parse(
    buf: bytes, *, limit: int | None = None, max_bytes: int | None = None, count_only: bool = False
) -> Parsed:
    """Frame the whole lines of `buf`, up to `limit` records and `max_bytes` of JSON
    (the first record is always taken). A partial last line is left for the caller."""
    out = Parsed()
    pos, size, taken = 0, len(buf), 0
    while pos < size:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            break
        doc = decode(buf[pos:nl])
        if doc is None:
            out.damaged += 1
        else:
            if limit is not None and len(out.starts) >= limit:
                break
            if max_bytes is not None and out.starts and taken + len(doc) > max_bytes:
                break
            taken += len(doc)
            out.starts.append(pos)
            if not count_only:
                out.docs.append(doc)
        pos = nl + 1
        out.end = pos
    return out
