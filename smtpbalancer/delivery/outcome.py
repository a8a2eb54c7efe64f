"""What one upstream answer means for each recipient, and for the upstream.

Pure policy (STYLE §7). Per recipient: 2xx DELIVERED, 4xx DEFER, 5xx FAIL.
A broken session (UpstreamError) defers everyone and counts against the
upstream; an answered transaction, even with 5xx recipients, counts for it.
A 5xx at MAIL FROM fails the whole transaction (Postfix `smtp_mesg_fail`
behaviour): equivalent relays would refuse the same sender.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from smtpbalancer.errors import UpstreamError
from smtpbalancer.replies import Reply, SendResult


class Fate(enum.StrEnum):
    DELIVERED = "delivered"
    DEFER = "defer"
    FAIL = "fail"


class Signal(enum.StrEnum):
    SUCCESS = "success"  # the upstream answered sensibly
    FAILURE = "failure"  # the upstream is suspect (breaker food)


@dataclass(frozen=True, slots=True)
class Verdict:
    fates: Mapping[str, Fate]
    replies: Mapping[str, Reply]
    signal: Signal
    upstream_queue_id: str = ""

    def having(self, fate: Fate) -> list[str]:
        return [r for r, f in self.fates.items() if f is fate]


def _fate(reply: Reply) -> Fate:
    if reply.ok:
        return Fate.DELIVERED
    return Fate.DEFER if reply.transient else Fate.FAIL


def broken_session_reply(error: UpstreamError) -> Reply:
    """RFC 5321 §3.8: a dropped connection is treated as if 451 had been received."""
    if error.code is not None and 400 <= error.code < 500:
        return Reply.parse(error.code, error.reason)
    return Reply(451, "4.4.2", f"{error.stage} with {error.upstream}: {error.reason}")


def classify(result: SendResult | UpstreamError, rcpts: Sequence[str]) -> Verdict:
    if isinstance(result, UpstreamError):
        reply = broken_session_reply(result)
        return Verdict(
            fates={r: Fate.DEFER for r in rcpts},
            replies={r: reply for r in rcpts},
            signal=Signal.FAILURE,
        )
    fates: dict[str, Fate] = {}
    replies: dict[str, Reply] = {}
    for rcpt in rcpts:
        reply = result.refused.get(rcpt, result.final)
        fates[rcpt] = _fate(reply)
        replies[rcpt] = reply
    return Verdict(fates, replies, Signal.SUCCESS, result.queue_id)
