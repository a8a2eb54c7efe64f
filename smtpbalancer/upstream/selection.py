"""Which upstream gets the next message: smooth weighted round-robin with tiers.

Pure policy: no I/O, no clock reads. The nginx "smooth" variant spreads picks
evenly (weights 5:1:1 give a a b a c a a, not a a a a a b c) and honours
weights exactly over any window of sum(weights) picks among stable candidates.

Tiers: backups are candidates only when no primary is eligible. `avoid` holds
upstreams that already deferred this message in the current round, so a retry
goes to a different relay first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    weight: int
    backup: bool
    eligible: bool  # breaker allows traffic now


class SmoothWeighted:
    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<SmoothWeighted {self._current}>"

    def pick(self, candidates: Iterable[Candidate]) -> str | None:
        total = 0
        best: str | None = None
        best_value = 0
        for c in candidates:
            if c.weight <= 0:
                continue
            value = self._current.get(c.name, 0) + c.weight
            self._current[c.name] = value
            total += c.weight
            if best is None or value > best_value:
                best, best_value = c.name, value
        if best is not None:
            self._current[best] = best_value - total
        return best

    def choose(
        self, candidates: list[Candidate], avoid: frozenset[str] = frozenset()
    ) -> str | None:
        """Pick from the first eligible tier; None when that whole tier is in `avoid`."""
        tier = active_tier(candidates)
        return self.pick(c for c in tier if c.name not in avoid)

    def forget(self, names: Iterable[str]) -> None:
        for name in names:
            self._current.pop(name, None)


def active_tier(candidates: list[Candidate]) -> list[Candidate]:
    """Eligible primaries with weight, else eligible backups with weight, else nothing."""
    primaries = [c for c in candidates if c.eligible and c.weight > 0 and not c.backup]
    if primaries:
        return primaries
    return [c for c in candidates if c.eligible and c.weight > 0 and c.backup]
