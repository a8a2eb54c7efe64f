"""Registry.choose decides the steady state without building Candidates; what it picks
must be what SmoothWeighted.choose over every upstream's Candidate picks, in every
state: health, drains, weights (0 too), breakers opening and probing, slow start,
backups, avoidance, rate limits and quotas (which never take the shortcut)."""

from __future__ import annotations

import random
from typing import Any

from smtpbalancer.config import BreakerConfig, UpstreamConfig
from smtpbalancer.replies import Signal
from smtpbalancer.upstream.breaker import BreakerState
from smtpbalancer.upstream.registry import Pick, Registry
from smtpbalancer.upstream.selection import Outcome, SmoothWeighted

POOLS = {
    "default": ("a", "b", "c"),  # c is a backup
    "limited": ("d", "e"),  # d has a rate limit: never the shortcut
    "quota": ("f", "g"),  # f has a daily quota: never the shortcut
}


class ManualClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def upstreams() -> list[UpstreamConfig]:
    def cfg(name: str, pool: str, **kw: Any) -> UpstreamConfig:
        return UpstreamConfig(
            name=f"rc-{name}", host="127.0.0.1", port=2525, pool=pool, slow_start_s=10.0, **kw
        )

    return [
        cfg("a", "default", weight=3),
        cfg("b", "default", weight=1),
        cfg("c", "default", weight=1, backup=True),
        cfg("d", "limited", weight=2, rate_per_s=2.0),
        cfg("e", "limited", weight=1),
        cfg("f", "quota", weight=1, daily_quota=5),
        cfg("g", "quota", weight=2),
    ]


def steady(registry: Registry, now: float) -> tuple[bool, bool]:
    """Whether the default pool's primaries are all healthy, closed, in service and
    weighted; and whether one of them is still in its slow start."""
    primaries = [registry[f"rc-{n}"] for n in ("a", "b")]
    up = all(
        u.healthy and u.breaker.state is BreakerState.CLOSED and not u.drained and u.weight > 0
        for u in primaries
    )
    ramping = any(now - u.in_service_since < u.config.slow_start_s for u in primaries)
    return up, ramping


def test_the_steady_shortcut_picks_what_the_candidates_would() -> None:
    rng = random.Random(7)
    clock = ManualClock()
    registry = Registry(
        upstreams(),
        BreakerConfig(failure_threshold=2, open_for_s=3.0, max_open_for_s=10.0),
        clock,
        local_hostname="x.test",
        timeout_s=5.0,
        rng=random.Random(1),
    )
    reference = {pool: SmoothWeighted() for pool in POOLS}
    names = [u.name for u in registry]
    seen = {"steady": 0, "ramping": 0, "other": 0}
    for _ in range(10000):
        clock.now += rng.choice((0.0, 0.01, 0.1, 0.5, 1.0))
        action = rng.random()
        name = rng.choice(names)
        if action < 0.01:
            registry.on_health(name, False, "test")
        elif action < 0.05:
            registry.on_health(name, True, "test")  # back in service: a slow start
        elif action < 0.06:
            registry.set_drained(name, True)
        elif action < 0.09:
            registry.set_drained(name, False)
        elif action < 0.10:
            registry.set_weight(name, rng.choice((0, 1, 2, 3)))
        elif action < 0.12:
            registry.set_weight(name, 1 if name.endswith("b") else 3)
        pool = rng.choice(tuple(POOLS))
        avoid = frozenset(f"rc-{n}" for n in POOLS[pool] if rng.random() < 0.1)
        now = clock.monotonic()
        if pool == "default" and not avoid:
            up, ramping = steady(registry, now)
            seen["ramping" if up and ramping else "steady" if up else "other"] += 1
        members = [u for u in registry if u.config.pool == pool]
        expected = reference[pool].choose([u.candidate(now) for u in members], now, avoid)
        got = registry.choose(now, avoid, pool)
        if isinstance(got, Pick):
            assert expected.outcome is Outcome.PICKED, (got, expected)
            assert got.upstream.name == expected.name
            if rng.random() < 0.05:
                registry.abandon(got)
            else:
                signal = rng.choice((Signal.SUCCESS,) * 8 + (Signal.FAILURE, Signal.NEUTRAL))
                registry.record(got, signal, "test")
        else:
            assert got == expected
    # Every kind of state came up often: the shortcut, and its boundaries.
    assert min(seen.values()) > 100, seen


def test_an_abandoned_probe_tells_parked_mail_to_try_again() -> None:
    """Mail parked behind a half-open probe has no timer: the probe's outcome unparks it.
    A probe that sends nothing (its message unreadable) is an outcome too."""
    clock = ManualClock()
    registry = Registry(
        upstreams()[:2],
        BreakerConfig(failure_threshold=1, open_for_s=3.0, max_open_for_s=10.0),
        clock,
        local_hostname="x.test",
        timeout_s=5.0,
        rng=random.Random(1),
    )
    recoveries: list[float] = []
    registry.on_recovery = lambda: recoveries.append(clock.now)
    for name in ("rc-a", "rc-b"):  # both breakers open, a first (weight 3 to 1)
        pick = registry.choose(clock.now, frozenset(), "default")
        assert isinstance(pick, Pick) and pick.upstream.name == name
        registry.record(pick, Signal.FAILURE, "refused")
    clock.now += 3.0
    probe = registry.choose(clock.now, frozenset(), "default")
    assert isinstance(probe, Pick) and probe.upstream.breaker.state is BreakerState.HALF_OPEN
    registry.abandon(probe)
    assert recoveries == [clock.now]
    again = registry.choose(clock.now, frozenset(), "default")
    assert isinstance(again, Pick)
    registry.abandon(again)  # the next probe, abandoned too: announced again
    registry.abandon(probe)  # a stale ticket frees nothing: not announced
    assert len(recoveries) == 2
