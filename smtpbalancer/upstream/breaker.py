"""Circuit breaker for one upstream.

Pure policy: no I/O, no asyncio, no clock reads. Callers pass `now`
(monotonic seconds) and report outcomes; every state change is returned as a
Transition so the caller can log and count it.

CLOSED    --(failure_threshold consecutive failures)--> OPEN
OPEN      --(open_for elapsed, at the next begin())----> HALF_OPEN
HALF_OPEN --(the probe succeeds)-----------------------> CLOSED
HALF_OPEN --(the probe fails)--------------------------> OPEN
While HALF_OPEN exactly one attempt (the probe) is let through at a time.
Outcomes of attempts that started before the breaker opened are ignored
while it is OPEN. Everything that changes breaker state lives in this file.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
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


@dataclass(frozen=True, slots=True)
class Transition:
    old: BreakerState
    new: BreakerState
    reason: str


class Breaker:
    def __init__(self, policy: BreakerPolicy) -> None:
        self._policy = policy
        self._state = BreakerState.CLOSED
        self._since = 0.0
        self._failures = 0
        self._probing = False

    def __repr__(self) -> str:
        return (
            f"<Breaker {self._state} since={self._since:.1f} failures={self._failures}"
            f" probing={self._probing}>"
        )

    @property
    def state(self) -> BreakerState:
        return self._state

    def retry_at(self) -> float | None:
        """When an OPEN breaker will let a probe through; None unless OPEN."""
        if self._state is BreakerState.OPEN:
            return self._since + self._policy.open_for_s
        return None

    def eligible(self, now: float) -> bool:
        """Would begin() let an attempt through now? No side effects."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.HALF_OPEN:
            return not self._probing
        return now >= self._since + self._policy.open_for_s

    def begin(self, now: float) -> Transition | None:
        """An attempt starts; call only when eligible(now) is True."""
        change = None
        if self._state is BreakerState.OPEN:
            change = self._move(BreakerState.HALF_OPEN, now, "open period elapsed")
        if self._state is BreakerState.HALF_OPEN:
            self._probing = True
        return change

    def record_success(self, now: float) -> Transition | None:
        if self._state is BreakerState.HALF_OPEN:
            return self._move(BreakerState.CLOSED, now, "probe succeeded")
        if self._state is BreakerState.CLOSED:
            self._failures = 0
        return None

    def record_failure(self, now: float, reason: str) -> Transition | None:
        if self._state is BreakerState.HALF_OPEN:
            return self._move(BreakerState.OPEN, now, f"probe failed: {reason}")
        if self._state is BreakerState.OPEN:
            return None
        self._failures += 1
        if self._failures >= self._policy.failure_threshold:
            return self._move(
                BreakerState.OPEN, now, f"{self._failures} consecutive failures, last: {reason}"
            )
        return None

    def _move(self, new: BreakerState, now: float, reason: str) -> Transition:
        if new not in _LEGAL[self._state]:
            raise AssertionError(f"breaker: illegal {self._state} -> {new}")
        change = Transition(self._state, new, reason)
        self._state, self._since, self._failures, self._probing = new, now, 0, False
        return change
