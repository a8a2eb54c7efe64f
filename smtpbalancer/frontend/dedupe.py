"""Duplicate suppression: an ESP that timed out waiting for 250 resends the same message.

With `[dedupe] window = "10m"`, a recipient of a message whose Message-ID, recipient
and body were already accepted inside the window is acknowledged but not queued again;
when every recipient is such a repeat, the message is answered 250 and not spooled.

Trade-offs (documented in the README): memory holds one 16-byte digest per accepted
recipient for the window (bounded by `max_entries`, oldest forgotten first); the
memory is per process (a restart, or a resend that reaches another worker, is not
caught); a message without a Message-ID is never treated as a repeat; a deliberate
resend of the very same message inside the window is suppressed too.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


def body_digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


def recipient_key(message_id: str, recipient: str, body_digest: bytes) -> bytes:
    material = b"\0".join((message_id.encode(), recipient.lower().encode(), body_digest))
    return hashlib.blake2b(material, digest_size=16).digest()


class DedupeWindow:
    def __init__(self, window_s: float, max_entries: int) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        # key -> (accepted at, queue id), oldest first
        self._seen: OrderedDict[bytes, tuple[float, str]] = OrderedDict()
        self.suppressed = 0

    def __repr__(self) -> str:
        return f"<DedupeWindow {self.window_s:g}s entries={len(self._seen)}>"

    def __len__(self) -> int:
        return len(self._seen)

    def repeats(self, keys: Sequence[bytes], now: float) -> list[str | None]:
        """For each key: the queue id it was accepted under inside the window, or None."""
        self._expire(now)
        return [None if (seen := self._seen.get(key)) is None else seen[1] for key in keys]

    def remember(self, keys: Sequence[bytes], now: float, queue_id: str) -> None:
        """Keys of recipients just made durable (call only after the 250 is certain)."""
        for key in keys:
            self._seen[key] = (now, queue_id)
            self._seen.move_to_end(key)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._seen:
            key, (at, _) = next(iter(self._seen.items()))
            if at > horizon:
                return
            del self._seen[key]
