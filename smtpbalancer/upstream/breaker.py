"""Circuit breaker for one upstream.

Pure policy: no I/O, no asyncio, no clock reads. Callers pass `now`
(monotonic seconds) and report outcomes; every state change is returned as a
Transition so the caller can log and count it. Randomness (jitter) comes from
an injected callable, so tests are exact.

CLOSED    --(failure_threshold consecutive failures)--> OPEN
OPEN      --(open period elapsed, at the next begin())--> HALF_OPEN
OPEN      --(active health check passed: expedite())---> HALF_OPEN
HALF_OPEN --(the probe succeeds)------------------------> CLOSED
HALF_OPEN --(the probe fails)---------------------------> OPEN
The open period is open_for, doubled on each re-open without a close in
between (capped at max_open_for), times a jitter factor in [1-j, 1+j] so
relays that failed together do not get probed in lockstep (REFERENCE: Envoy
outlier ejection, with jitter).

While HALF_OPEN exactly one attempt, the probe, is let through. begin()
hands out a ticket; outcomes reported with a stale ticket (an attempt that
started before the breaker opened) are ignored while OPEN or HALF_OPEN.
Everything that changes breaker state lives in this file.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_LEGAL: Final[Mapping[BreakerState, frozenset[BreakerState]]] = {
    BreakerState.CLOSED: frozenset({BreakerState.OPEN}),
    BreakerState.OPEN: frozenset({BreakerState.HALF_OPEN}),
    BreakerState.HALF_OPEN: frozenset({BreakerState.CLOSED, BreakerState.OPEN}),
}


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_threshold: int = 5
    open_for_s: float = 30.0
    max_open_for_s: float = 300.0
    jitter: float = 0.2


@dataclass(frozen=True, slots=True)
class Transition:
    old: BreakerState
    new: BreakerState
    reason: str


class Breaker:
    def __init__(self, policy: BreakerPolicy, rand: Callable[[], float] = lambda: 0.5) -> None:
        self._policy = policy
        self._rand = rand
        self._state = BreakerState.CLOSED
        self.closed = True  # _state is CLOSED: read per message, so a plain attribute
        self._since = 0.0
        self._failures = 0
        self._reopens = 0  # opens since the last close: the exponent of the open period
        self._open_s = policy.open_for_s
        self._ticket = 0  # increments at every transition
        self._probe: int | None = None  # the HALF_OPEN probe's ticket, once handed out

    def __repr__(self) -> str:
        return (
            f"<Breaker {self._state} since={self._since:.1f} failures={self._failures}"
            f" open_for={self._open_s:.1f}s probing={self._probe is not None}>"
        )

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def open_for_s(self) -> float:
        """The length of the current (or last) open period."""
        return self._open_s

    def retune(self, policy: BreakerPolicy) -> None:
        """A config reload: the state stays; the next open period follows the new policy."""
        self._policy = policy

    def retry_at(self) -> float | None:
        """When an OPEN breaker will let a probe through; None unless OPEN."""
        if self._state is BreakerState.OPEN:
            return self._since + self._open_s
        return None

    def eligible(self, now: float) -> bool:
        """Would begin() let an attempt through now? No side effects."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.HALF_OPEN:
            return self._probe is None
        return now >= self._since + self._open_s

    def begin(self, now: float) -> tuple[int, Transition | None]:
        """An attempt starts (call only when eligible): its ticket, and a transition if any."""
        change = None
        if self._state is BreakerState.OPEN:
            change = self._move(BreakerState.HALF_OPEN, now, "open period elapsed")
        if self._state is BreakerState.HALF_OPEN:
            self._probe = self._ticket
        return self._ticket, change

    def expedite(self, now: float, reason: str) -> Transition | None:
        """An active health check passed: let a probe through now instead of waiting."""
        if self._state is BreakerState.OPEN:
            return self._move(BreakerState.HALF_OPEN, now, reason)
        return None

    def abandon(self, ticket: int) -> bool:
        """An attempt ended without an outcome (nothing was sent): free the probe slot.
        True if it was the probe, i.e. another attempt may go now."""
        if self._state is BreakerState.HALF_OPEN and ticket == self._probe:
            self._probe = None
            return True
        return False

    def record_success(self, now: float, ticket: int) -> Transition | None:
        if self._state is BreakerState.HALF_OPEN and ticket == self._probe:
            self._reopens = 0
            return self._move(BreakerState.CLOSED, now, "probe succeeded")
        if self._state is BreakerState.CLOSED:
            self._failures = 0
        return None

    def record_failure(self, now: float, reason: str, ticket: int) -> Transition | None:
        if self._state is BreakerState.HALF_OPEN:
            if ticket != self._probe:
                return None
            self._reopens += 1
            return self._open(now, f"probe failed: {reason}")
        if self._state is BreakerState.OPEN:
            return None
        self._failures += 1
        if self._failures >= self._policy.failure_threshold:
            return self._open(now, f"{self._failures} consecutive failures, last: {reason}")
        return None

    def _open(self, now: float, reason: str) -> Transition:
        p = self._policy
        base = min(p.open_for_s * 2.0 ** min(self._reopens, 30), p.max_open_for_s)
        self._open_s = base * (1.0 - p.jitter + 2.0 * p.jitter * self._rand())
        return self._move(BreakerState.OPEN, now, f"{reason}; open for {self._open_s:.1f}s")

    def _move(self, new: BreakerState, now: float, reason: str) -> Transition:
        if new not in _LEGAL[self._state]:
            raise AssertionError(f"breaker: illegal {self._state} -> {new}")
        change = Transition(self._state, new, reason)
        self._state, self._since, self._failures, self._probe = new, now, 0, None
        self.closed = new is BreakerState.CLOSED
        self._ticket += 1
        return change
