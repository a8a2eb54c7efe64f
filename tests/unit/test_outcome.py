"""Specification of outcome classification: one upstream answer -> a fate per recipient."""

from __future__ import annotations

import pytest

from smtpbalancer.delivery.outcome import (
    Fate,
    Signal,
    Verdict,
    broken_session_reply,
    classify,
    is_throttling,
    merge,
    not_tried,
)
from smtpbalancer.errors import UpstreamError
from smtpbalancer.replies import Reply, SendResult

A, B, C = "a@example.test", "b@example.test", "c@example.test"
QUEUED = Reply(250, "2.0.0", "Ok: queued as 8BDCA22DA71")
UNKNOWN_USER = Reply(550, "5.1.1", "User unknown")
GREYLISTED = Reply(450, "4.2.0", "Greylisted")


def test_each_recipient_gets_its_own_fate_and_reply() -> None:
    result = SendResult(refused={B: UNKNOWN_USER, C: GREYLISTED}, final=QUEUED, queue_id="8BD")
    verdict = classify(result, [A, B, C])
    assert verdict == Verdict(
        fates={A: Fate.DELIVERED, B: Fate.FAIL, C: Fate.DEFER},
        replies={A: QUEUED, B: UNKNOWN_USER, C: GREYLISTED},
        signal=Signal.SUCCESS,
        upstream_queue_id="8BD",
    )
    assert verdict.having(Fate.DELIVERED) == [A]
    assert verdict.having(Fate.FAIL) == [B]
    assert verdict.having(Fate.DEFER) == [C]


@pytest.mark.parametrize(
    ("code", "fate"),
    [
        (250, Fate.DELIVERED),
        (251, Fate.DELIVERED),
        (421, Fate.DEFER),
        (450, Fate.DEFER),
        (452, Fate.DEFER),
        (550, Fate.FAIL),
        (553, Fate.FAIL),
        (554, Fate.FAIL),
    ],
)
def test_reply_class_decides_the_fate(code: int, fate: Fate) -> None:
    reply = Reply(code, "", "whatever")
    verdict = classify(SendResult(refused={A: reply}, final=QUEUED), [A])
    assert verdict.fates == {A: fate}
    assert verdict.replies == {A: reply}


def test_all_recipients_refused() -> None:
    summary = Reply(554, "5.5.1", "Error: no valid recipients")
    result = SendResult(refused={A: UNKNOWN_USER, B: GREYLISTED}, final=summary)
    verdict = classify(result, [A, B])
    assert verdict.fates == {A: Fate.FAIL, B: Fate.DEFER}
    assert verdict.replies == {A: UNKNOWN_USER, B: GREYLISTED}
    assert verdict.signal is Signal.SUCCESS  # the upstream answered sensibly


def test_mail_from_5xx_fails_every_recipient() -> None:
    sender_refused = Reply(553, "5.7.1", "Sender address rejected")
    verdict = classify(SendResult(refused={}, final=sender_refused), [A, B])
    assert verdict.fates == {A: Fate.FAIL, B: Fate.FAIL}
    assert verdict.replies == {A: sender_refused, B: sender_refused}
    assert verdict.signal is Signal.SUCCESS


def test_data_451_defers_every_recipient() -> None:
    local_error = Reply(451, "4.3.0", "Error: queue file write error")
    verdict = classify(SendResult(refused={}, final=local_error), [A, B])
    assert verdict.fates == {A: Fate.DEFER, B: Fate.DEFER}
    assert verdict.replies == {A: local_error, B: local_error}
    assert verdict.upstream_queue_id == ""


def test_a_broken_session_defers_everyone_and_blames_the_upstream() -> None:
    error = UpstreamError("relay-a", "connect", "connection refused")
    verdict = classify(error, [A, B])
    reply = Reply(451, "4.4.2", "connect with relay-a: connection refused")
    assert verdict == Verdict(
        fates={A: Fate.DEFER, B: Fate.DEFER},
        replies={A: reply, B: reply},
        signal=Signal.FAILURE,
        upstream_queue_id="",
        reason="connect: 451 4.4.2 connect with relay-a: connection refused",
    )
    assert reply.line == "451 4.4.2 connect with relay-a: connection refused"


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (421, "4.3.2 Service shutting down", Reply(421, "4.3.2", "Service shutting down")),
        (421, "Too busy", Reply(421, "", "Too busy")),
        (None, "timed out", Reply(451, "4.4.2", "data with relay-b: timed out")),
        # A 5xx that broke the session is still the upstream's fault, not the message's.
        (
            554,
            "5.3.0 Transaction failed",
            Reply(451, "4.4.2", "data with relay-b: 5.3.0 Transaction failed"),
        ),
    ],
)
def test_broken_session_reply_keeps_a_4xx_code(
    code: int | None, reason: str, expected: Reply
) -> None:
    reply = broken_session_reply(UpstreamError("relay-b", "data", reason, code=code))
    assert reply == expected
    assert reply.transient


def test_upstream_queue_id_is_carried_through() -> None:
    result = SendResult(refused={}, final=QUEUED, queue_id="8BDCA22DA71")
    assert classify(result, [A]).upstream_queue_id == "8BDCA22DA71"


def test_no_recipients_gives_an_empty_verdict() -> None:
    verdict = classify(SendResult(refused={}, final=QUEUED), [])
    assert (dict(verdict.fates), dict(verdict.replies)) == ({}, {})


# --- what the upstream's breaker and rate controller hear -----------------------------

MAIL_451 = SendResult(refused={}, final=Reply(451, "4.3.0", "try later"), stage="mail")
DATA_451 = SendResult(refused={}, final=Reply(451, "4.3.0", "try later"), stage="data")
RCPT_450 = SendResult(
    refused={A: Reply(450, "4.2.0", "mailbox busy")}, final=Reply(250, "2.0.0", "ok"), stage="data"
)
RCPT_550 = SendResult(
    refused={A: Reply(550, "5.1.1", "no such user")}, final=Reply(250, "2.0.0", "ok"), stage="data"
)
ALL_RCPT_451 = SendResult(
    refused={A: Reply(451, "4.3.0", "later"), B: Reply(451, "4.3.0", "later")},
    final=Reply(554, "5.5.0", "all recipients refused"),
    stage="rcpt",
)
SES_THROTTLE = SendResult(
    refused={},
    final=Reply(454, "", "Throttling failure: Maximum sending rate exceeded."),
    stage="mail",
)
RATE_47 = SendResult(
    refused={A: Reply(451, "4.7.1", "Rate limited, slow down")},
    final=Reply(250, "2.0.0", "ok"),
    stage="data",
)


@pytest.mark.parametrize(
    ("result", "signal"),
    [
        (MAIL_451, Signal.FAILURE),  # session-level 4xx at MAIL: the relay is unwell
        (DATA_451, Signal.FAILURE),  # ... or after DATA
        (RCPT_450, Signal.SUCCESS),  # a per-recipient 4xx is about the recipient
        (ALL_RCPT_451, Signal.SUCCESS),  # still per recipient (a single-recipient 4xx is common)
        (RCPT_550, Signal.SUCCESS),  # a per-recipient 5xx is not an upstream failure
        (SES_THROTTLE, Signal.THROTTLED),
        (RATE_47, Signal.THROTTLED),
        (UpstreamError("r", "mail", "4.7.0 Too many connections", 421), Signal.THROTTLED),
        (UpstreamError("r", "mail", "4.3.2 Too many messages in one session", 421), Signal.NEUTRAL),
        (UpstreamError("r", "connect", "refused"), Signal.FAILURE),
    ],
)
def test_signal_for_the_upstream(result: SendResult | UpstreamError, signal: Signal) -> None:
    verdict = classify(result, [A, B])
    assert verdict.signal is signal
    assert (verdict.reason == "") is (signal is Signal.SUCCESS)


@pytest.mark.parametrize(
    ("reply", "throttling"),
    [
        (Reply(454, "4.7.0", "Throttling failure"), True),
        (Reply(421, "4.7.0", "Try again later"), True),
        (Reply(451, "", "Sending rate exceeded"), True),
        (Reply(452, "4.5.3", "Too many recipients"), False),
        (Reply(451, "4.3.0", "Local error"), False),
        (Reply(554, "5.7.1", "Rate limited forever"), False),  # permanent: not a throttle
    ],
)
def test_is_throttling(reply: Reply, throttling: bool) -> None:
    assert is_throttling(reply) is throttling


def test_merge_keeps_every_recipient_and_the_worst_signal() -> None:
    first = classify(SendResult(refused={}, final=Reply(250, "2.0.0", "queued as X1")), [A])
    second = classify(DATA_451, [B])
    merged = merge([first, second])
    assert merged.fates == {A: Fate.DELIVERED, B: Fate.DEFER}
    assert merged.signal is Signal.FAILURE
    assert merged.reason == "data: 451 4.3.0 try later"


def test_not_tried_chunks_defer_without_blaming_the_relay() -> None:
    throttled = classify(SES_THROTTLE, [A])
    merged = merge([throttled, not_tried([B])])
    assert merged.fates == {A: Fate.DEFER, B: Fate.DEFER}
    assert merged.signal is Signal.THROTTLED, "the throttle still cuts the rate"
