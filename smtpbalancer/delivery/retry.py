"""When to try a deferred message again, and when to give up.

Pure policy: callers pass the round number, the message's age and a random
number in [0, 1). Backoff doubles per round from `initial_s`, capped at
`max_s`, with ±20% jitter so a burst of deferrals does not retry in lockstep;
the result always stays within [initial_s, max_s].
"""

from __future__ import annotations

from dataclasses import dataclass

JITTER = 0.2


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_s: float
    max_s: float
    lifetime_s: float

    def backoff(self, rounds: int, rand: float) -> float:
        """Delay before round `rounds + 1` (rounds >= 1 failed rounds so far)."""
        base = self.initial_s * 2.0 ** min(max(rounds - 1, 0), 60)
        delay = min(base, self.max_s) * (1.0 - JITTER + 2.0 * JITTER * rand)
        return min(max(delay, self.initial_s), self.max_s)

    def expired(self, age_s: float) -> bool:
        return age_s >= self.lifetime_s
