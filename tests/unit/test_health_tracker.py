"""Specification of the health tracker: fall/rise sequences, each flip reported once."""

from __future__ import annotations

import pytest

from smtpbalancer.upstream.health import HealthTracker

OK, BAD = True, False


@pytest.mark.parametrize(
    ("fall", "rise", "probes", "flips"),
    [
        # Starts healthy; successes report nothing.
        (2, 2, [OK, OK, OK], [None, None, None]),
        # fall consecutive failures mark it down, once.
        (2, 2, [BAD, BAD, BAD, BAD], [None, False, None, None]),
        # A success in between resets the failure count.
        (2, 2, [BAD, OK, BAD, OK, BAD, BAD], [None, None, None, None, None, False]),
        # rise consecutive successes mark it up again, once.
        (2, 2, [BAD, BAD, OK, OK, OK], [None, False, None, True, None]),
        # A failure while recovering resets the success count.
        (
            2,
            3,
            [BAD, BAD, OK, OK, BAD, OK, OK, OK],
            [None, False, None, None, None, None, None, True],
        ),
        # fall=1, rise=1: every change of outcome flips.
        (1, 1, [BAD, BAD, OK, BAD, OK, OK], [False, None, True, False, True, None]),
        # Up-and-down flapping below the thresholds never flips.
        (3, 3, [BAD, BAD, OK, BAD, BAD, OK, BAD, BAD], [None] * 8),
    ],
)
def test_fall_rise_sequences(
    fall: int, rise: int, probes: list[bool], flips: list[bool | None]
) -> None:
    tracker = HealthTracker(fall=fall, rise=rise)
    assert tracker.healthy is True
    assert [tracker.record(ok) for ok in probes] == flips


def test_healthy_follows_the_flips_and_repr_shows_the_counts() -> None:
    tracker = HealthTracker(fall=3, rise=2)
    tracker.record(BAD)
    assert tracker.healthy and tracker.failures == 1
    assert repr(tracker) == "<HealthTracker up failures=1 successes=0 fall=3 rise=2>"
    tracker.record(BAD)
    tracker.record(BAD)
    assert not tracker.healthy and tracker.failures == 3
    assert repr(tracker) == "<HealthTracker down failures=3 successes=0 fall=3 rise=2>"
    tracker.record(OK)
    assert not tracker.healthy and tracker.failures == 0
    assert tracker.record(OK) is True and tracker.healthy


@pytest.mark.parametrize(("fall", "rise"), [(0, 1), (1, 0), (-1, 2)])
def test_rejects_thresholds_below_one(fall: int, rise: int) -> None:
    with pytest.raises(ValueError):
        HealthTracker(fall=fall, rise=rise)
