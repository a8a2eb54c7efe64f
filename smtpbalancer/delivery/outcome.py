"""What one upstream answer means for each recipient, and for the upstream.

Pure policy (STYLE §7). Per recipient: 2xx DELIVERED, 4xx DEFER, 5xx FAIL.
For the upstream (what its circuit breaker and rate controller hear):
- FAILURE: the session broke (UpstreamError: connect, timeout, disconnect, a
  421 anywhere), or a session-level 4xx at MAIL or after DATA — the relay is
  unwell, not the recipient. A per-recipient 4xx or 5xx is not.
- THROTTLED: the relay says we send too fast (454, a 4.7.x status, or a
  rate/throttling text). Counts as a failure for the breaker and cuts the
  upstream's effective rate (AIMD).
- NEUTRAL: "421 too many messages in one session" — the connection is
  recycled and nothing is held against the relay (REFERENCE: connection reuse).
- SUCCESS: the relay answered sensibly, even with per-recipient 4xx/5xx.
A 5xx at MAIL FROM fails the whole transaction (Postfix `smtp_mesg_fail`):
equivalent relays would refuse the same sender.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from smtpbalancer.errors import UpstreamError
from smtpbalancer.replies import Reply, SendResult, Signal

__all__ = [
    "Fate",
    "Signal",
    "Verdict",
    "broken_session_reply",
    "classify",
    "is_throttling",
    "merge",
]


class Fate(enum.StrEnum):
    DELIVERED = "delivered"
    DEFER = "defer"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Verdict:
    fates: Mapping[str, Fate]
    replies: Mapping[str, Reply]
    signal: Signal
    upstream_queue_id: str = ""
    reason: str = ""  # why the signal is not SUCCESS, for the breaker's log line

    def having(self, fate: Fate) -> list[str]:
        return [r for r, f in self.fates.items() if f is fate]


_THROTTLE_TEXT = re.compile(
    r"throttl|rate.?limit|sending rate|rate exceeded|too many (messages|connections|requests)",
    re.IGNORECASE,
)
_SESSION_FULL = re.compile(r"too many messages", re.IGNORECASE)


def is_throttling(reply: Reply) -> bool:
    if not reply.transient:
        return False
    return (
        reply.code == 454
        or reply.status.startswith("4.7.")
        or _THROTTLE_TEXT.search(reply.text) is not None
    )


def _fate(reply: Reply) -> Fate:
    if reply.ok:
        return Fate.DELIVERED
    return Fate.DEFER if reply.transient else Fate.FAIL


def broken_session_reply(error: UpstreamError) -> Reply:
    """RFC 5321 §3.8: a dropped connection is treated as if 451 had been received."""
    if error.code is not None and 400 <= error.code < 500:
        return Reply.parse(error.code, error.reason)
    return Reply(451, "4.4.2", f"{error.stage} with {error.upstream}: {error.reason}")


def _broken(error: UpstreamError, rcpts: Sequence[str]) -> Verdict:
    reply = broken_session_reply(error)
    if error.code == 421 and _SESSION_FULL.search(error.reason):
        signal = Signal.NEUTRAL
    elif is_throttling(reply):
        signal = Signal.THROTTLED
    else:
        signal = Signal.FAILURE
    return Verdict(
        fates={r: Fate.DEFER for r in rcpts},
        replies={r: reply for r in rcpts},
        signal=signal,
        reason=f"{error.stage}: {reply.line}",
    )


def classify(result: SendResult | UpstreamError, rcpts: Sequence[str]) -> Verdict:
    if isinstance(result, UpstreamError):
        return _broken(result, rcpts)
    fates: dict[str, Fate] = {}
    replies: dict[str, Reply] = {}
    for rcpt in rcpts:
        reply = result.refused.get(rcpt, result.final)
        fates[rcpt] = _fate(reply)
        replies[rcpt] = reply
    signal, reason = Signal.SUCCESS, ""
    throttled = [r for r in replies.values() if is_throttling(r)]
    if throttled:
        signal, reason = Signal.THROTTLED, f"{result.stage}: {throttled[0].line}"
    elif result.final.transient and result.stage in ("mail", "data"):
        signal, reason = Signal.FAILURE, f"{result.stage}: {result.final.line}"
    return Verdict(fates, replies, signal, result.queue_id, reason)


_NOT_TRIED = Reply(451, "4.4.2", "not tried: an earlier transaction of this message failed")


def not_tried(rcpts: Sequence[str]) -> Verdict:
    """Recipients of a split message left for later after an earlier chunk failed."""
    return Verdict(
        fates={r: Fate.DEFER for r in rcpts},
        replies={r: _NOT_TRIED for r in rcpts},
        signal=Signal.NEUTRAL,
    )


_WORST_FIRST = (Signal.FAILURE, Signal.THROTTLED, Signal.NEUTRAL)


def merge(verdicts: Sequence[Verdict]) -> Verdict:
    """One verdict for a message sent in several transactions (recipient limit)."""
    fates: dict[str, Fate] = {}
    replies: dict[str, Reply] = {}
    for v in verdicts:
        fates.update(v.fates)
        replies.update(v.replies)
    worst = next(
        (v for s in _WORST_FIRST for v in verdicts if v.signal is s),
        verdicts[-1],
    )
    queue_id = next((v.upstream_queue_id for v in reversed(verdicts) if v.upstream_queue_id), "")
    return Verdict(fates, replies, worst.signal, queue_id, worst.reason)
