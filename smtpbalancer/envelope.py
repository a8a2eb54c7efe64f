"""Message identity and envelope: the words every subsystem shares.

A queue id is time-ordered (sorts by arrival), unique across restarts, and safe
as a file name: 12 hex digits of milliseconds, then 8 of a per-process random
start plus a counter, uppercase, like Postfix's long queue ids.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_QUEUE_ID = re.compile(r"[0-9A-F]{20}")


def valid_queue_id(text: str) -> bool:
    return _QUEUE_ID.fullmatch(text) is not None


class QueueIds:
    """Generator of time-ordered queue ids. Not thread-safe: call it from the loop."""

    def __init__(self) -> None:
        # Start in the lower half: the counter cannot wrap (and break ordering within one
        # millisecond) before 2**31 ids.
        self._counter = int.from_bytes(os.urandom(4), "big") >> 1

    def next(self, wall: float) -> str:
        self._counter = (self._counter + 1) & 0xFFFFFFFF
        return f"{int(wall * 1000) & 0xFFFFFFFFFFFF:012X}{self._counter:08X}"


DEFAULT_POOL = "default"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the client gave us in MAIL and RCPT (`mail_from` is "" for the null sender),
    and what the front end noted at DATA: the pool its route chose, and for delivery
    events the Message-ID header and the header values `[events] copy_headers` names."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    smtputf8: bool = False
    body_8bit: bool = False
    pool: str = DEFAULT_POOL
    message_id: str = ""
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def null_sender(self) -> bool:
        return self.mail_from == ""
