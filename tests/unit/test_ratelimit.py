"""Specification of the send limits: plain floats for time, exact counts."""

from __future__ import annotations

import pytest

from smtpbalancer.upstream.ratelimit import Aimd, RollingQuota, TokenBucket


def poll(bucket: TokenBucket, *, start_ms: int, end_ms: int) -> int:
    """take() once every simulated millisecond from start_ms to end_ms inclusive."""
    return sum(bucket.take(ms / 1000) for ms in range(start_ms, end_ms + 1))


# --- TokenBucket ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst", "expected"),
    [
        (50.0, None, 50 * 10 + 50),  # default burst: one second's worth
        (50.0, 5.0, 50 * 10 + 5),
        (0.5, None, 5 + 1),  # slow rates still hold one token
        (1000.0, None, 1000 * 10 + 1),  # one poll per ms caps it: 10 001 polls
        (7.0, 3.0, 70 + 3),
    ],
)
def test_tokens_over_ten_seconds_polled_every_ms(
    rate: float, burst: float | None, expected: int
) -> None:
    bucket = TokenBucket(rate, burst=burst)
    assert poll(bucket, start_ms=0, end_ms=10_000) == expected


def test_burst_is_available_at_once_then_the_rate_applies() -> None:
    bucket = TokenBucket(10.0, burst=3.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.05) is False
    assert bucket.take(100.1) is True
    assert bucket.take(100.1) is False


def test_idle_time_never_stores_more_than_burst() -> None:
    bucket = TokenBucket(10.0, burst=2.0)
    assert sum(bucket.take(1000.0) for _ in range(10)) == 2


def test_default_burst_is_one_second_of_rate_but_at_least_one() -> None:
    assert repr(TokenBucket(50.0)) == "<TokenBucket rate=50/s tokens=50.00/50>"
    assert repr(TokenBucket(0.25)) == "<TokenBucket rate=0.25/s tokens=1.00/1>"


@pytest.mark.parametrize(
    ("takes", "now", "expected"),
    [
        (0, 0.0, 0.0),  # full: now
        (2, 0.0, 0.1),  # empty: one token every 0.1 s
        (2, 0.04, 0.1),  # part of the next token already earned
        (2, 0.1, 0.1),
        (2, 5.0, 5.0),
        (1, 0.0, 0.0),  # one token left
    ],
)
def test_ready_at(takes: int, now: float, expected: float) -> None:
    bucket = TokenBucket(10.0, burst=2.0)
    for _ in range(takes):
        assert bucket.take(0.0)
    assert bucket.ready_at(now) == pytest.approx(expected)


def test_ready_at_has_no_side_effects_and_take_succeeds_then() -> None:
    bucket = TokenBucket(3.0, burst=1.0)
    assert bucket.take(0.0)
    at = bucket.ready_at(0.0)
    assert at == pytest.approx(1 / 3)
    assert bucket.ready_at(0.0) == at
    assert bucket.take(at - 1e-6) is False
    assert bucket.take(at) is True


def test_time_running_backwards_creates_no_tokens() -> None:
    bucket = TokenBucket(1.0, now=10.0)
    assert bucket.take(10.0)
    assert bucket.take(5.0) is False
    assert bucket.ready_at(5.0) == pytest.approx(11.0)
    assert bucket.take(11.0)


def test_set_rate_midway_credits_the_old_rate_up_to_now() -> None:
    bucket = TokenBucket(10.0)  # burst 10
    assert poll(bucket, start_ms=0, end_ms=1000) == 10 + 10
    bucket.set_rate(100.0, now=1.0)  # burst follows the rate: 100, bucket is empty
    assert bucket.rate_per_s == 100.0
    assert poll(bucket, start_ms=1001, end_ms=2000) == 100
    bucket.set_rate(1.0, now=2.0)  # burst shrinks to 1
    assert poll(bucket, start_ms=2001, end_ms=5000) == 3


def test_set_rate_keeps_earned_tokens_but_clips_them_to_the_new_burst() -> None:
    bucket = TokenBucket(10.0, now=0.0)
    for _ in range(10):
        assert bucket.take(0.0)
    bucket.set_rate(1.0, now=0.5)  # 5 tokens earned at the old rate, clipped to burst 1
    assert repr(bucket) == "<TokenBucket rate=1/s tokens=1.00/1>"
    bucket.set_rate(100.0, now=0.5)  # growing the burst does not add tokens
    assert repr(bucket) == "<TokenBucket rate=100/s tokens=1.00/100>"


def test_explicit_burst_survives_set_rate() -> None:
    bucket = TokenBucket(10.0, burst=4.0)
    bucket.set_rate(100.0, now=0.0)
    assert sum(bucket.take(60.0) for _ in range(10)) == 4


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.0, None), (-1.0, None), (float("inf"), None), (10.0, 0.5)]
)
def test_rejects_nonsense(rate: float, burst: float | None) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst=burst)


# --- Aimd -------------------------------------------------------------------------------


def test_aimd_cut_cooldown_recovery_floor_and_cap() -> None:
    aimd = Aimd(100.0)
    assert aimd.effective == 100.0
    assert aimd.on_success() is False  # already at the configured rate
    steps: list[tuple[str, bool, float]] = []

    def throttle(now: float) -> None:
        steps.append((f"throttle@{now}", aimd.on_throttle(now), aimd.effective))

    def success() -> None:
        steps.append(("success", aimd.on_success(), aimd.effective))

    throttle(10.0)
    throttle(10.5)  # same burst of replies: ignored
    throttle(10.99)
    throttle(11.0)  # a full cooldown after the cut
    success()
    success()
    throttle(11.5)  # within the cooldown of the 11.0 cut
    assert steps == [
        ("throttle@10.0", True, 50.0),
        ("throttle@10.5", False, 50.0),
        ("throttle@10.99", False, 50.0),
        ("throttle@11.0", True, 25.0),
        ("success", True, 27.0),
        ("success", True, 29.0),
        ("throttle@11.5", False, 29.0),
    ]


def test_aimd_recovers_in_exact_steps_and_caps_at_configured() -> None:
    aimd = Aimd(100.0)
    assert aimd.on_throttle(0.0)
    changed = [aimd.on_success() for _ in range(26)]
    assert changed == [True] * 25 + [False]
    assert aimd.effective == 100.0


def test_aimd_never_goes_below_the_floor() -> None:
    aimd = Aimd(100.0)
    seen = []
    for second in range(8):
        cut = aimd.on_throttle(float(second))
        seen.append((cut, aimd.effective))
    assert seen == [
        (True, 50.0),
        (True, 25.0),
        (True, 12.5),
        (True, 6.25),
        (True, 5.0),  # floor: 5% of configured
        (False, 5.0),
        (False, 5.0),
        (False, 5.0),
    ]
    assert repr(aimd) == "<Aimd effective=5/100 per s>"


def test_aimd_parameters() -> None:
    aimd = Aimd(60.0, decrease=0.75, increase_fraction=0.1, floor_fraction=0.5, cooldown_s=0.0)
    assert aimd.on_throttle(0.0) and aimd.effective == 45.0
    assert aimd.on_throttle(0.0) and aimd.effective == 33.75
    assert aimd.on_throttle(0.0) and aimd.effective == 30.0
    assert aimd.on_success() and aimd.effective == 36.0
    assert aimd.configured == 60.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decrease": 1.0},
        {"decrease": 0.0},
        {"increase_fraction": 0.0},
        {"floor_fraction": 0.0},
        {"floor_fraction": 1.5},
        {"cooldown_s": -1.0},
    ],
)
def test_aimd_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Aimd(10.0, **kwargs)


# --- RollingQuota -----------------------------------------------------------------------


def test_quota_counts_and_exhausts() -> None:
    quota = RollingQuota(3, window_s=60.0, buckets=60)
    assert quota.used(0.0) == 0 and not quota.exhausted(0.0)
    quota.record(0.5)
    quota.record(10.0, count=2)
    assert quota.used(10.0) == 3
    assert quota.exhausted(10.0)
    assert repr(quota) == "<RollingQuota used=3/3 window=60s>"


@pytest.mark.parametrize(
    ("now", "used"),
    [
        (59.9, 3),
        (60.4, 3),  # the t=0.5 send's bucket [0, 1) is still inside the window
        (61.0, 2),  # ...and has left it
        (69.9, 2),
        (70.0, 1),
        (80.0, 1),
        (81.0, 0),
        (10_000.0, 0),
    ],
)
def test_quota_rolls_off_after_the_window(now: float, used: int) -> None:
    quota = RollingQuota(10, window_s=60.0, buckets=60)
    quota.record(0.5)
    quota.record(9.0)
    quota.record(20.999)
    assert quota.used(now) == used


def test_quota_never_allows_more_than_limit_in_any_real_window() -> None:
    # One send attempt every 0.25 s for 5 minutes, sent whenever the quota allows.
    window, limit = 60.0, 30
    quota = RollingQuota(limit, window_s=window, buckets=12)
    sent: list[float] = []
    for step in range(1200):
        now = step * 0.25
        if not quota.exhausted(now):
            quota.record(now)
            sent.append(now)
    for i, start in enumerate(sent):
        in_window = [t for t in sent[i:] if t < start + window]
        assert len(in_window) <= limit
    assert len(sent) > 4 * limit  # and it does keep sending


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (30.0, 61.0),  # the oldest bucket [0, 1) leaves at 61
        (60.9, 61.0),
        (61.0, 61.0),  # no longer exhausted: now
        (75.0, 75.0),
    ],
)
def test_frees_at(now: float, expected: float) -> None:
    quota = RollingQuota(3, window_s=60.0, buckets=60)
    quota.record(0.2)
    quota.record(0.7)
    quota.record(30.0)
    # limit 3, used 3 at t=30: one send must leave; the two in bucket 0 leave together.
    assert quota.frees_at(now) == expected


def test_frees_at_when_over_the_limit_waits_for_enough_buckets() -> None:
    quota = RollingQuota(2, window_s=10.0, buckets=10)
    for t in (0.0, 1.0, 2.0, 3.0):  # recorded regardless of the limit (e.g. in-flight sends)
        quota.record(t)
    assert quota.used(3.0) == 4
    assert quota.frees_at(3.0) == 13.0  # buckets 0, 1 and 2 must all leave
    assert quota.exhausted(12.99)
    assert not quota.exhausted(13.0)


def test_frees_at_with_default_per_minute_buckets() -> None:
    quota = RollingQuota(1)  # one a day
    quota.record(3_600.0)
    assert quota.frees_at(3_600.0) == 3_600.0 + 86_400.0 + 60.0
    assert quota.exhausted(3_600.0 + 86_400.0 + 59.0)
    assert not quota.exhausted(3_600.0 + 86_400.0 + 60.0)


def test_quota_memory_is_per_bucket_not_per_send() -> None:
    quota = RollingQuota(1_000_000, window_s=60.0, buckets=6)
    for step in range(100_000):
        quota.record(step * 0.0005)  # 100 000 sends within 50 s
    assert len(quota._counts) == 7
    assert quota.used(60.0) == 100_000
    assert quota.used(200.0) == 0


def test_quota_time_running_backwards_frees_nothing() -> None:
    quota = RollingQuota(5, window_s=10.0, buckets=10)
    quota.record(100.0)
    quota.record(50.0)  # counted in the newest bucket
    assert quota.used(50.0) == 2
    assert quota.used(110.5) == 2
    assert quota.used(111.0) == 0


@pytest.mark.parametrize(
    "kwargs", [{"limit": 0}, {"limit": 1, "window_s": 0.0}, {"limit": 1, "buckets": 0}]
)
def test_quota_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RollingQuota(**kwargs)  # type: ignore[arg-type]
