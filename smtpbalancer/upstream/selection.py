"""Which upstream gets the next message: smooth weighted round-robin with tiers.

Pure policy: no I/O, no clock reads. The nginx "smooth" variant spreads picks
evenly (weights 5:1:1 give a a b a c a a, not a a a a a b c) and honours
weights exactly over any window of sum(weights) picks among stable candidates.

- Tiers: backups are candidates only when no primary is eligible.
- `avoid`: upstreams that already deferred this message in the current round,
  so a retry goes to a different relay first.
- Rate limits: among the fresh candidates only those with a token now are
  picked; if none has one, the answer is to wait until the first will.
- Slow start: an upstream back in service ramps from 10% of its weight to all
  of it over its slow-start window (REFERENCE: Envoy min_weight_percent 10%).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final, NamedTuple, Protocol, TypeVar

SLOW_START_FLOOR = 0.1


class Candidate(NamedTuple):  # a tuple: one per upstream per message, the cheapest to build
    name: str
    weight: float  # effective weight (slow start applied); <= 0 = never selected
    backup: bool
    eligible: bool  # healthy, breaker allows, quota left
    ready_at: float = 0.0  # when its rate limiter has a token (<= now: ready)


class Outcome(enum.StrEnum):
    PICKED = "picked"
    WAIT = "wait"  # fresh candidates exist but are rate-limited until `wait_until`
    ALL_AVOIDED = "all_avoided"  # every eligible upstream deferred it this round
    NONE_ELIGIBLE = "none_eligible"  # nothing can take mail: park


class Choice(NamedTuple):  # a tuple, like Candidate: one per message
    outcome: Outcome
    name: str = ""
    wait_until: float = 0.0


_NONE_ELIGIBLE: Final = Choice(Outcome.NONE_ELIGIBLE)
_ALL_AVOIDED: Final = Choice(Outcome.ALL_AVOIDED)


def slow_start_weight(weight: float, in_service_s: float, window_s: float) -> float:
    """Weight of an upstream that came back `in_service_s` ago, ramping linearly."""
    if weight <= 0 or window_s <= 0 or in_service_s >= window_s:
        return weight
    share = SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * max(in_service_s, 0.0) / window_s
    return weight * share


def active_tier(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Eligible primaries with weight, else eligible backups with weight, else nothing."""
    usable = [c for c in candidates if c.eligible and c.weight > 0]
    primaries = [c for c in usable if not c.backup]
    return primaries or [c for c in usable if c.backup]


class Weighted(Protocol):
    """What a pick needs of a candidate: a Candidate, or anything named with a weight."""

    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> float: ...


W = TypeVar("W", bound=Weighted)


class SmoothWeighted:
    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<SmoothWeighted {self._current}>"

    def pick(self, candidates: Iterable[Candidate]) -> str | None:
        best = self.pick_one(candidates)
        return None if best is None else best.name

    def pick_one(self, candidates: Iterable[W]) -> W | None:
        """`pick`, returning the candidate itself. The caller may pass its own objects
        when it knows them all eligible, ready and at full weight (see Registry.choose)."""
        current = self._current
        total = 0.0
        best: W | None = None
        best_value = 0.0
        for c in candidates:
            weight = c.weight
            if weight <= 0:
                continue
            name = c.name
            value = current.get(name, 0.0) + weight
            current[name] = value
            total += weight
            if best is None or value > best_value:
                best, best_value = c, value
        if best is not None:
            current[best.name] = best_value - total
        return best

    def choose(
        self, candidates: list[Candidate], now: float, avoid: frozenset[str] = frozenset()
    ) -> Choice:
        tier = active_tier(candidates)
        if not tier:
            return _NONE_ELIGIBLE
        fresh = [c for c in tier if c.name not in avoid] if avoid else tier
        if not fresh:
            return _ALL_AVOIDED
        name = self.pick([c for c in fresh if c.ready_at <= now])
        if name is None:
            return Choice(Outcome.WAIT, wait_until=min(c.ready_at for c in fresh))
        return Choice(Outcome.PICKED, name)

    def forget(self, names: Iterable[str]) -> None:
        for name in names:
            self._current.pop(name, None)
