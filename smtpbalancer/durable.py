"""Small durable-file helpers shared by the spool and the event outbox.

Blocking: call them from a worker thread (or at startup), never on the event loop.
Segment files are named by a zero-padded sequence number and a suffix, so that
names sort in write order.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (creations, renames, unlinks) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sequences(directory: Path, suffix: str) -> list[int]:
    """Sequence numbers of the `<digits><suffix>` files in `directory`, in order."""
    found = []
    for name in os.listdir(directory):
        stem, dot, ext = name.partition(".")
        if dot and f".{ext}" == suffix and stem.isascii() and stem.isdigit():
            found.append(int(stem))
    return sorted(found)


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """Up to `length` bytes at `offset` (fewer only at the end of the file)."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
