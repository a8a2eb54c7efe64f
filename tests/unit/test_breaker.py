"""Specification of the circuit breaker: plain floats for time, a fixed 'random'."""

from __future__ import annotations

import pytest

from smtpbalancer.upstream.breaker import Breaker, BreakerPolicy, BreakerState, Transition

CLOSED, OPEN, HALF = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
POLICY = BreakerPolicy(failure_threshold=3, open_for_s=10.0, max_open_for_s=60.0, jitter=0.2)


def breaker(rand: float = 0.5) -> Breaker:
    return Breaker(POLICY, rand=lambda: rand)


def fail(b: Breaker, now: float, times: int = 1) -> Transition | None:
    change = None
    for _ in range(times):
        ticket, _ = b.begin(now)
        change = b.record_failure(now, "boom", ticket) or change
    return change


def test_stays_closed_below_the_threshold_and_a_success_resets_the_count() -> None:
    b = breaker()
    assert fail(b, 0.0, times=2) is None
    ticket, _ = b.begin(0.0)
    assert b.record_success(0.0, ticket) is None
    assert fail(b, 0.0, times=2) is None
    assert b.state is CLOSED


def test_opens_at_the_threshold_with_the_reason() -> None:
    b = breaker()
    change = fail(b, 5.0, times=3)
    assert change is not None and (change.old, change.new) == (CLOSED, OPEN)
    assert change.reason == "3 consecutive failures, last: boom; open for 10.0s"
    assert b.retry_at() == 15.0


@pytest.mark.parametrize(("now", "eligible"), [(5.0, False), (14.99, False), (15.0, True)])
def test_open_is_not_eligible_until_the_open_period_ends(now: float, eligible: bool) -> None:
    b = breaker()
    fail(b, 5.0, times=3)
    assert b.eligible(now) is eligible


def test_half_open_lets_exactly_one_probe_through() -> None:
    b = breaker()
    fail(b, 0.0, times=3)
    ticket, change = b.begin(10.0)
    assert change == Transition(OPEN, HALF, "open period elapsed")
    assert not b.eligible(10.0), "a second attempt must wait for the probe"
    assert b.record_success(10.5, ticket) == Transition(HALF, CLOSED, "probe succeeded")
    assert b.eligible(10.5)


@pytest.mark.parametrize(
    ("rand", "open_periods"),
    [
        (0.5, [10.0, 20.0, 40.0, 60.0, 60.0]),  # doubles, capped at max_open_for
        (0.0, [8.0, 16.0, 32.0, 48.0, 48.0]),  # jitter -20%
        (1.0, [12.0, 24.0, 48.0, 72.0, 72.0]),  # jitter +20%
    ],
)
def test_each_failed_probe_doubles_the_open_period_with_jitter(
    rand: float, open_periods: list[float]
) -> None:
    b = breaker(rand)
    fail(b, 0.0, times=3)
    now, seen = 0.0, [b.open_for_s]
    for _ in range(4):
        now = b.retry_at() or now
        ticket, _ = b.begin(now)
        b.record_failure(now, "still down", ticket)
        seen.append(b.open_for_s)
    assert seen == pytest.approx(open_periods)


def test_a_close_resets_the_doubling() -> None:
    b = breaker()
    fail(b, 0.0, times=3)
    ticket, _ = b.begin(10.0)
    b.record_failure(10.0, "x", ticket)  # re-open: 20 s
    ticket, _ = b.begin(30.0)
    b.record_success(30.0, ticket)
    fail(b, 31.0, times=3)
    assert b.open_for_s == 10.0


def test_late_outcomes_from_before_the_open_are_ignored() -> None:
    b = breaker()
    stale, _ = b.begin(0.0)  # started while closed, answers late
    fail(b, 0.0, times=3)
    assert b.record_failure(1.0, "late", stale) is None
    probe, _ = b.begin(10.0)
    assert b.record_success(10.1, stale) is None, "a stale success must not close it"
    assert b.state is HALF
    assert b.record_failure(10.2, "late", stale) is None, "nor a stale failure re-open it"
    assert b.record_success(10.3, probe) is not None
    assert b.state is CLOSED


def test_a_passing_health_check_expedites_the_probe() -> None:
    b = breaker()
    fail(b, 0.0, times=3)
    assert not b.eligible(1.0)
    assert b.expedite(1.0, "health check passed") == Transition(OPEN, HALF, "health check passed")
    assert b.eligible(1.0)
    assert b.expedite(1.0, "again") is None


def test_repr_shows_state_and_counts() -> None:
    b = breaker()
    fail(b, 0.0, times=2)
    assert repr(b) == "<Breaker closed since=0.0 failures=2 open_for=10.0s probing=False>"


def test_an_abandoned_probe_frees_the_half_open_slot() -> None:
    b = breaker()
    fail(b, 0.0, times=3)
    probe, _ = b.begin(10.0)
    assert not b.eligible(10.0)
    b.abandon(probe)  # nothing was sent (e.g. the body could not be read)
    assert b.eligible(10.0) and b.state is HALF
