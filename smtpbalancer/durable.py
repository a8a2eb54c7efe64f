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
