"""Specification of the circuit breaker: a pure state machine driven with plain float times."""

from __future__ import annotations

import pytest

from smtpbalancer.upstream.breaker import Breaker, BreakerPolicy, BreakerState, Transition

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
POLICY = BreakerPolicy(failure_threshold=3, open_for_s=30.0)


def opened_at(t: float) -> Breaker:
    """A breaker that tripped at time t."""
    breaker = Breaker(POLICY)
    for _ in range(POLICY.failure_threshold):
        breaker.record_failure(t, "timeout")
    assert breaker.state is OPEN
    return breaker


def half_open_at(t: float) -> Breaker:
    """A breaker that tripped 30 s before t and whose probe started at t."""
    breaker = opened_at(t - POLICY.open_for_s)
    breaker.begin(t)
    assert breaker.state is HALF_OPEN
    return breaker


def test_a_new_breaker_is_closed_and_eligible() -> None:
    breaker = Breaker(POLICY)
    assert breaker.state is CLOSED
    assert breaker.eligible(0.0) is True
    assert breaker.retry_at() is None
    assert breaker.begin(0.0) is None
    assert breaker.eligible(0.0) is True  # CLOSED lets any number of attempts through


@pytest.mark.parametrize("failures", [1, 2])
def test_closed_stays_closed_below_the_threshold(failures: int) -> None:
    breaker = Breaker(POLICY)
    assert [breaker.record_failure(float(i), "timeout") for i in range(failures)] == [
        None
    ] * failures
    assert breaker.state is CLOSED
    assert breaker.eligible(10.0) is True


def test_opens_at_the_threshold() -> None:
    breaker = Breaker(POLICY)
    breaker.record_failure(1.0, "timeout")
    breaker.record_failure(2.0, "timeout")
    change = breaker.record_failure(3.0, "connection refused")
    assert change == Transition(CLOSED, OPEN, "3 consecutive failures, last: connection refused")
    assert breaker.state is OPEN
    assert breaker.retry_at() == 33.0


def test_a_success_resets_the_consecutive_count() -> None:
    breaker = Breaker(POLICY)
    breaker.record_failure(1.0, "timeout")
    breaker.record_failure(2.0, "timeout")
    assert breaker.record_success(3.0) is None
    assert breaker.record_failure(4.0, "timeout") is None
    assert breaker.record_failure(5.0, "timeout") is None
    assert breaker.state is CLOSED
    assert breaker.record_failure(6.0, "timeout") is not None
    assert breaker.state is OPEN


@pytest.mark.parametrize(
    ("now", "eligible"),
    [(100.0, False), (115.0, False), (129.999, False), (130.0, True), (500.0, True)],
)
def test_open_is_eligible_only_after_open_for(now: float, eligible: bool) -> None:
    breaker = opened_at(100.0)
    assert breaker.eligible(now) is eligible
    assert breaker.state is OPEN  # eligible() has no side effects


def test_begin_after_open_for_moves_to_half_open() -> None:
    breaker = opened_at(100.0)
    assert breaker.begin(130.0) == Transition(OPEN, HALF_OPEN, "open period elapsed")
    assert breaker.state is HALF_OPEN
    assert breaker.retry_at() is None


def test_half_open_lets_one_probe_through_at_a_time() -> None:
    breaker = half_open_at(130.0)
    assert breaker.eligible(130.0) is False
    assert breaker.eligible(10_000.0) is False  # no amount of waiting admits a second probe


def test_a_successful_probe_closes() -> None:
    breaker = half_open_at(130.0)
    assert breaker.record_success(131.0) == Transition(HALF_OPEN, CLOSED, "probe succeeded")
    assert breaker.state is CLOSED
    assert breaker.eligible(131.0) is True
    # The closed breaker starts counting from zero again.
    assert breaker.record_failure(132.0, "timeout") is None
    assert breaker.record_failure(133.0, "timeout") is None
    assert breaker.state is CLOSED


def test_a_failed_probe_reopens_for_another_open_for() -> None:
    breaker = half_open_at(130.0)
    change = breaker.record_failure(135.0, "421 too busy")
    assert change == Transition(HALF_OPEN, OPEN, "probe failed: 421 too busy")
    assert breaker.state is OPEN
    assert breaker.retry_at() == 165.0
    assert breaker.eligible(164.0) is False
    assert breaker.eligible(165.0) is True


def test_outcomes_while_open_are_ignored() -> None:
    breaker = opened_at(100.0)
    assert breaker.record_failure(101.0, "late failure") is None
    assert breaker.record_success(102.0) is None
    assert breaker.state is OPEN
    assert breaker.retry_at() == 130.0  # a late failure does not extend the open period


def test_the_full_cycle_is_a_sequence_of_transitions() -> None:
    breaker = Breaker(POLICY)
    changes = [breaker.record_failure(t, "x") for t in (1.0, 2.0, 3.0)]
    changes += [breaker.begin(33.0), breaker.record_failure(34.0, "y")]
    changes += [breaker.begin(64.0), breaker.record_success(65.0)]
    assert [(c.old, c.new) for c in changes if c is not None] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


def test_repr_shows_state_and_counts() -> None:
    breaker = Breaker(POLICY)
    breaker.record_failure(7.0, "x")
    assert repr(breaker) == "<Breaker closed since=0.0 failures=1 probing=False>"
    assert repr(half_open_at(130.0)) == "<Breaker half_open since=130.0 failures=0 probing=True>"
