"""The header section of a message as bytes: find fields, read values, remove a field.

Pure and small on purpose: the front end reads a few fields at DATA (routing header,
Message-ID, headers copied into delivery events) and may strip the routing header.
Bodies are CRLF-normalised before this runs (frontend/hardening.py). A field is its
first line plus any continuation lines (RFC 5322 §2.2.3 folding); names compare
case-insensitively. Only the header section (up to the first empty line) is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

_MAX_HEADER_BYTES = 256 * 1024  # a header section longer than this is not searched further


@dataclass(frozen=True, slots=True)
class Field:
    name: str  # as written
    value: str  # unfolded, surrounding white space removed
    start: int  # byte offsets of the whole field (all its lines, CRLFs included)
    end: int


def fields(message: bytes) -> Iterator[Field]:
    """The header fields of `message`, in order; stops at the empty line ending the header."""
    at, limit = 0, min(len(message), _MAX_HEADER_BYTES)
    while at < limit:
        end = message.find(b"\r\n", at)
        if end < 0 or end == at:  # no more lines, or the empty line: the body starts
            return
        colon = message.find(b":", at, end)
        stop = end + 2
        while stop < len(message) and message[stop : stop + 1] in (b" ", b"\t"):
            nxt = message.find(b"\r\n", stop)
            stop = len(message) if nxt < 0 else nxt + 2
        if colon > at:
            raw_value = message[colon + 1 : stop].replace(b"\r\n", b"")
            yield Field(
                name=message[at:colon].decode("utf-8", "replace").strip(),
                value=raw_value.decode("utf-8", "replace").strip(),
                start=at,
                end=stop,
            )
        at = stop


def first(message: bytes, name: str) -> str | None:
    """The value of the first field called `name`, or None."""
    wanted = name.lower()
    return next((f.value for f in fields(message) if f.name.lower() == wanted), None)


def values(message: bytes, names: tuple[str, ...]) -> dict[str, str]:
    """The first value of each of `names` present, keyed by the name as configured."""
    by_lower: dict[str, list[str]] = {}
    for name in names:
        by_lower.setdefault(name.lower(), []).append(name)
    found: dict[str, str] = {}
    for f in fields(message):
        for configured in by_lower.get(f.name.lower(), ()):
            found.setdefault(configured, f.value)
    return found


def remove(message: bytes, name: str) -> bytes:
    """`message` without any field called `name` (all its lines)."""
    wanted = name.lower()
    spans = [(f.start, f.end) for f in fields(message) if f.name.lower() == wanted]
    if not spans:
        return message
    parts, at = [], 0
    for start, end in spans:
        parts.append(message[at:start])
        at = end
    parts.append(message[at:])
    return b"".join(parts)
