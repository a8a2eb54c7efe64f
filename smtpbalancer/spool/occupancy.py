"""Occupancy of the segment log: live records and bytes per segment, and what to do
when they change.

Pure bookkeeping: no I/O, no asyncio, no clock; the store acts on the verdicts.
- RECLAIM: a segment the writer has left holds nothing live: unlink it and its marks.
- COMPACT: a left segment's live bytes fell below `compact_below` of its size (and it
  is big enough to matter): copy its live records forward into the open segment, so a
  few stragglers (a message deferred for days) do not each pin a 64 MiB file.
- ROTATE: everything in the open segment is done and it passed `idle_rotate_bytes`:
  start a fresh one, so a drained spool holds little.
Only segments with an acknowledged record are tracked; the writer removes the others.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.StrEnum):
    NONE = "none"
    RECLAIM = "reclaim"
    COMPACT = "compact"
    ROTATE = "rotate"


@dataclass(slots=True)
class _Segment:
    live: int = 0
    live_bytes: int = 0
    size: int = 0  # bytes written (the end of its last record)


class Occupancy:
    def __init__(
        self, *, compact_below: float, compact_min_bytes: int, idle_rotate_bytes: int
    ) -> None:
        self._compact_below = compact_below
        self._compact_min_bytes = compact_min_bytes
        self._idle_rotate_bytes = idle_rotate_bytes
        self._segments: dict[int, _Segment] = {}
        self.active: int | None = None  # the writer's segment (as of the last batch)

    def __repr__(self) -> str:
        live = sum(s.live for s in self._segments.values())
        return f"<Occupancy segments={len(self._segments)} live={live} active={self.active}>"

    def __len__(self) -> int:
        return len(self._segments)

    def live(self, seq: int) -> int:
        segment = self._segments.get(seq)
        return 0 if segment is None else segment.live

    def add(self, seq: int, offset: int, length: int) -> None:
        """A live record of `length` bytes at `offset` (written, or found by recovery)."""
        segment = self._segments.get(seq)
        if segment is None:
            segment = self._segments[seq] = _Segment()
        segment.live += 1
        segment.live_bytes += length
        segment.size = max(segment.size, offset + length)

    def sized(self, seq: int, size: int) -> Action:
        """Recovery knows the whole size (records finished after the last live one too),
        once the segment's live records are added; a recovered segment is never open."""
        segment = self._segments.get(seq)
        if segment is None:
            return Action.NONE
        segment.size = max(segment.size, size)
        return self._verdict(seq, segment)

    def remove(self, seq: int, length: int) -> Action:
        """A record finished (or moved away)."""
        segment = self._segments[seq]
        segment.live -= 1
        segment.live_bytes -= length
        if seq == self.active:
            idle = segment.live == 0 and segment.size >= self._idle_rotate_bytes
            return Action.ROTATE if idle else Action.NONE
        return self._verdict(seq, segment)

    def switch(self, active: int | None) -> tuple[int | None, Action]:
        """The writer is on `active` now; what to do with the segment it left, if any."""
        left, self.active = self.active, active
        if left is None or left == active or left not in self._segments:
            return None, Action.NONE
        return left, self._verdict(left, self._segments[left])

    def _verdict(self, seq: int, segment: _Segment) -> Action:
        if segment.live == 0:
            del self._segments[seq]
            return Action.RECLAIM
        sparse = segment.live_bytes < segment.size * self._compact_below
        if sparse and segment.size >= self._compact_min_bytes:
            return Action.COMPACT
        return Action.NONE
