"""Per-upstream send limits: a token bucket, adaptive (AIMD) throttling and a rolling quota.

Pure policy: no I/O, no asyncio, no logging, no metrics, no clock reads. Callers
pass `now` (monotonic seconds) and get decisions back; the shell (registry,
dispatcher) logs, counts and sleeps.

- TokenBucket: `rate_per_s` sends per second on average, bursts up to `burst`.
- Aimd: moves the bucket's rate between a floor and the configured rate, halving
  on a throttling reply (at most once per cooldown) and creeping back on success.
- RollingQuota: at most `limit` sends in any rolling window (e.g. 10 000 a day),
  counted in fixed buckets so memory is O(buckets), never O(sends).

Time that runs backwards (a caller passing an older `now`) never creates tokens
or frees quota; it is treated as the latest time seen.
"""

from __future__ import annotations

import math

# Refilling in many small float steps can leave 0.9999999999 tokens where the exact
# answer is 1; a token that close counts as whole so polled limits come out exact.
_EPSILON = 1e-9


class TokenBucket:
    """Rate limiter: `rate_per_s` tokens per second, at most `burst` stored.

    `burst` defaults to max(1.0, rate_per_s), one second's worth. The bucket starts full.
    """

    def __init__(self, rate_per_s: float, *, burst: float | None = None, now: float = 0.0) -> None:
        _check_rate(rate_per_s)
        if burst is not None and not burst >= 1.0:
            raise ValueError(f"token bucket: burst must be at least 1, got {burst}")
        self._rate = rate_per_s
        self._fixed_burst = burst
        self._burst = _default_burst(rate_per_s) if burst is None else burst
        self._tokens = self._burst
        self._last = now

    def __repr__(self) -> str:
        return f"<TokenBucket rate={self._rate:g}/s tokens={self._tokens:.2f}/{self._burst:g}>"

    @property
    def rate_per_s(self) -> float:
        return self._rate

    def take(self, now: float) -> bool:
        """Take one token if one is available."""
        self._refill(now)
        if self._tokens + _EPSILON >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def ready_at(self, now: float) -> float:
        """Earliest time >= now at which take() will succeed. No side effects."""
        missing = 1.0 - self._tokens_at(now)
        if missing <= _EPSILON:
            return now
        return max(now, self._last) + missing / self._rate

    def set_rate(self, rate_per_s: float, now: float) -> None:
        """Switch rate: tokens earned up to `now` are credited at the old rate."""
        _check_rate(rate_per_s)
        self._refill(now)
        self._rate = rate_per_s
        if self._fixed_burst is None:
            self._burst = _default_burst(rate_per_s)
            self._tokens = min(self._tokens, self._burst)

    def _tokens_at(self, now: float) -> float:
        elapsed = now - self._last
        if elapsed <= 0.0:
            return self._tokens
        return min(self._burst, self._tokens + elapsed * self._rate)

    def _refill(self, now: float) -> None:
        self._tokens = self._tokens_at(now)
        self._last = max(self._last, now)


def _check_rate(rate_per_s: float) -> None:
    if not (rate_per_s > 0.0 and math.isfinite(rate_per_s)):
        raise ValueError(f"token bucket: rate must be positive and finite, got {rate_per_s}")


def _default_burst(rate_per_s: float) -> float:
    return max(1.0, rate_per_s)


class Aimd:
    """Adaptive throttling: the effective rate stays between a floor and the configured rate.

    on_throttle multiplies by `decrease`, at most once per `cooldown_s`, so a burst of
    throttling replies from messages already in flight counts as one signal; never below
    `floor_fraction` of the configured rate. on_success adds `increase_fraction` of the
    configured rate, capped at the configured rate.
    """

    def __init__(
        self,
        configured_per_s: float,
        *,
        decrease: float = 0.5,
        increase_fraction: float = 0.02,
        floor_fraction: float = 0.05,
        cooldown_s: float = 1.0,
    ) -> None:
        _check_rate(configured_per_s)
        if not 0.0 < decrease < 1.0:
            raise ValueError(f"aimd: decrease must be within (0, 1), got {decrease}")
        if not 0.0 < increase_fraction <= 1.0:
            raise ValueError(
                f"aimd: increase_fraction must be within (0, 1], got {increase_fraction}"
            )
        if not 0.0 < floor_fraction <= 1.0:
            raise ValueError(f"aimd: floor_fraction must be within (0, 1], got {floor_fraction}")
        if not cooldown_s >= 0.0:
            raise ValueError(f"aimd: cooldown_s must not be negative, got {cooldown_s}")
        self._configured = configured_per_s
        self._decrease = decrease
        self._step = configured_per_s * increase_fraction
        self._floor = configured_per_s * floor_fraction
        self._cooldown_s = cooldown_s
        self._effective = configured_per_s
        self._last_cut: float | None = None

    def __repr__(self) -> str:
        return f"<Aimd effective={self._effective:g}/{self._configured:g} per s>"

    @property
    def configured(self) -> float:
        return self._configured

    @property
    def effective(self) -> float:
        return self._effective

    def on_throttle(self, now: float) -> bool:
        """A throttling reply arrived; True if the rate was cut."""
        if self._last_cut is not None and now - self._last_cut < self._cooldown_s:
            return False
        cut = max(self._floor, self._effective * self._decrease)
        if cut >= self._effective:
            return False  # already at the floor: nothing to cut, no cooldown to start
        self._effective, self._last_cut = cut, now
        return True

    def on_success(self) -> bool:
        """A send succeeded; True if the rate changed."""
        raised = min(self._configured, self._effective + self._step)
        if raised == self._effective:
            return False
        self._effective = raised
        return True


class RollingQuota:
    """At most `limit` sends in any rolling `window_s`, counted in `buckets` time buckets.

    Times fall into buckets of window_s / buckets seconds. A send stays counted until
    its whole bucket has left the window, i.e. for between window_s and
    window_s + window_s / buckets: coarse on the safe side, so no real window of
    window_s ever holds more than `limit` sends. Queries advance the ring lazily.
    """

    def __init__(self, limit: int, *, window_s: float = 86400.0, buckets: int = 1440) -> None:
        if limit < 1:
            raise ValueError(f"rolling quota: limit must be at least 1, got {limit}")
        if not (window_s > 0.0 and math.isfinite(window_s)):
            raise ValueError(f"rolling quota: window_s must be positive, got {window_s}")
        if buckets < 1:
            raise ValueError(f"rolling quota: buckets must be at least 1, got {buckets}")
        self._limit = limit
        self._width_s = window_s / buckets
        # One slot more than `buckets`: the current, partly elapsed bucket plus a full window.
        self._counts = [0] * (buckets + 1)
        self._head: int | None = None  # absolute index of the newest bucket the ring covers
        self._used = 0

    def __repr__(self) -> str:
        return f"<RollingQuota used={self._used}/{self._limit} window={self._window_s:g}s>"

    @property
    def limit(self) -> int:
        return self._limit

    def used(self, now: float) -> int:
        self._advance(now)
        return self._used

    def exhausted(self, now: float) -> bool:
        return self.used(now) >= self._limit

    def record(self, now: float, count: int = 1) -> None:
        if count < 0:
            raise ValueError(f"rolling quota: count must not be negative, got {count}")
        head = self._advance(now)
        self._counts[head % len(self._counts)] += count
        self._used += count

    def frees_at(self, now: float) -> float:
        """When used() will next drop below the limit; `now` if it already is."""
        head = self._advance(now)
        excess = self._used - self._limit  # this many sends must leave, plus one
        if excess < 0:
            return now
        slots = len(self._counts)
        for index in range(head - slots + 1, head + 1):  # oldest bucket first
            excess -= self._counts[index % slots]
            if excess < 0:
                # Bucket `index` is counted while the current bucket is at most index + buckets.
                return (index + slots) * self._width_s
        raise AssertionError("rolling quota: running total disagrees with the buckets")

    @property
    def _window_s(self) -> float:
        return self._width_s * (len(self._counts) - 1)

    def _advance(self, now: float) -> int:
        """Drop buckets that left the window; return the current bucket's index."""
        current = math.floor(now / self._width_s)
        head = self._head
        if head is None or current - head >= len(self._counts):
            self._counts = [0] * len(self._counts)
            self._used = 0
        elif current > head:
            slots = len(self._counts)
            for index in range(head + 1, current + 1):
                self._used -= self._counts[index % slots]
                self._counts[index % slots] = 0
        if head is None or current > head:
            self._head = head = current
        return head
