"""Specification of the retry policy: doubling backoff, capped, jittered within bounds."""

from __future__ import annotations

import pytest

from smtpbalancer.delivery.retry import RetryPolicy

POLICY = RetryPolicy(initial_s=30.0, max_s=900.0, lifetime_s=5 * 86_400.0)


@pytest.mark.parametrize(
    ("rounds", "expected_s"),
    [
        (0, 30.0),
        (1, 30.0),
        (2, 60.0),
        (3, 120.0),
        (4, 240.0),
        (5, 480.0),
        (6, 900.0),  # 960 capped
        (7, 900.0),
        (1000, 900.0),  # the exponent is bounded: no overflow
    ],
)
def test_backoff_doubles_and_is_capped_with_middle_jitter(rounds: int, expected_s: float) -> None:
    assert POLICY.backoff(rounds, rand=0.5) == expected_s


@pytest.mark.parametrize(
    ("rounds", "rand", "expected_s"),
    [
        (2, 0.0, 48.0),  # -20%
        (2, 0.75, 66.0),  # +10%
        (3, 0.0, 96.0),
        (4, 0.25, 216.0),  # -10%
        (1, 0.0, 30.0),  # 24 raised to initial_s
        (5, 0.999, 575.808),  # +19.96%
        (6, 0.0, 720.0),  # the cap is jittered too: 900 * 0.8
        (6, 0.999, 900.0),  # ... but never above max_s
    ],
)
def test_backoff_jitter(rounds: int, rand: float, expected_s: float) -> None:
    assert POLICY.backoff(rounds, rand) == pytest.approx(expected_s, abs=1e-9)


@pytest.mark.parametrize("rand", [0.0, 0.999])
@pytest.mark.parametrize("rounds", [1, 2, 3, 4, 5, 6, 7, 50])
def test_backoff_stays_within_initial_and_max(rounds: int, rand: float) -> None:
    assert POLICY.initial_s <= POLICY.backoff(rounds, rand) <= POLICY.max_s


@pytest.mark.parametrize(
    ("age_s", "expired"),
    [(0.0, False), (431_999.9, False), (432_000.0, True), (500_000.0, True)],
)
def test_expired_at_lifetime(age_s: float, expired: bool) -> None:
    assert POLICY.expired(age_s) is expired
