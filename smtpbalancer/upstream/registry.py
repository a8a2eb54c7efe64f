"""The upstream pool as a whole: one Upstream (pool, breaker, limits, health) per relay.

The shell around the pure policies. It asks each upstream whether it may take
mail now (healthy, breaker allows, daily quota left, a rate token), lets
SmoothWeighted choose, and turns outcomes into breaker and rate decisions:
every breaker Transition and every health flip is one log line and one metric.
When an upstream becomes usable again it calls `on_recovery`, so parked mail
moves at once instead of waiting for a timer.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from smtpbalancer import metrics
from smtpbalancer.clock import Clock
from smtpbalancer.config import BreakerConfig, PoolConfig, UpstreamConfig, fallback_pool
from smtpbalancer.envelope import DEFAULT_POOL
from smtpbalancer.errors import UpstreamError
from smtpbalancer.replies import SendResult, Signal
from smtpbalancer.tasks import spawn
from smtpbalancer.upstream.breaker import Breaker, BreakerPolicy, BreakerState, Transition
from smtpbalancer.upstream.connection import Security, UpstreamConnection
from smtpbalancer.upstream.pool import Pool
from smtpbalancer.upstream.ratelimit import Aimd, RollingQuota, TokenBucket
from smtpbalancer.upstream.selection import (
    Candidate,
    Choice,
    Outcome,
    SmoothWeighted,
    slow_start_weight,
)

log = logging.getLogger(__name__)

_STATES = tuple(s.value for s in BreakerState)


class Upstream:
    def __init__(
        self,
        config: UpstreamConfig,
        breaker_config: BreakerConfig,
        clock: Clock,
        *,
        local_hostname: str,
        timeout_s: float,
        rand: Callable[[], float],
        security: Security | None = None,
    ) -> None:
        self.config = config
        self.local_hostname = local_hostname
        self.timeout_s = timeout_s
        self.name = config.name
        self.breaker = Breaker(
            BreakerPolicy(
                breaker_config.failure_threshold,
                breaker_config.open_for_s,
                breaker_config.max_open_for_s,
            ),
            rand,
        )
        self.healthy = True
        self.drained = False  # an operator took it out of rotation (admin endpoint)
        self.weight = config.weight  # an operator may change it at runtime
        self.in_service_since = -math.inf  # slow start runs from here
        self._clock = clock
        now = clock.monotonic()
        rate = config.rate_per_s
        self.bucket = TokenBucket(rate, now=now) if rate else None
        self.aimd = Aimd(rate) if rate else None
        self.quota = RollingQuota(config.daily_quota) if config.daily_quota else None
        self.metrics = metrics.UpstreamMetrics(config.name)
        # One pool per upstream, so sessions with different TLS settings or credentials
        # never share a pool; the TLS context is built once and shared by its sessions.
        self.security = security or Security.of(config)
        self.pool = Pool(
            config.name,
            lambda: UpstreamConnection(
                config.name,
                config.host,
                config.port,
                local_hostname=self.local_hostname,
                timeout_s=self.timeout_s,
                security=self.security,
            ),
            clock,
            max_connections=config.max_connections,
            max_messages=config.max_messages_per_connection,
        )
        metrics.UPSTREAM_INFO.labels(self.name, config.pool).set(1)
        metrics.set_breaker_state(self.name, BreakerState.CLOSED.value, _STATES)
        metrics.bind_upstream_gauges(
            self.name, lambda: float(self.pool.size), lambda: 1.0 if self.healthy else 0.0
        )
        self.metrics.effective_rate.set(rate or math.inf)

    def __repr__(self) -> str:
        return (
            f"<Upstream {self.name} weight={self.config.weight} healthy={self.healthy}"
            f" {self.breaker!r} {self.pool!r}>"
        )

    @property
    def effective_rate(self) -> float | None:
        return self.aimd.effective if self.aimd else None

    def candidate(self, now: float) -> Candidate:
        eligible = (
            self.healthy
            and not self.drained
            and self.breaker.eligible(now)
            and not (self.quota is not None and self.quota.exhausted(now))
        )
        weight = slow_start_weight(
            self.weight, now - self.in_service_since, self.config.slow_start_s
        )
        ready_at = self.bucket.ready_at(now) if self.bucket else 0.0
        return Candidate(self.name, weight, self.config.backup, eligible, ready_at)

    async def send(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        body: bytes,
        *,
        smtputf8: bool,
        body_8bit: bool,
        crlf_clean: bool = False,
    ) -> SendResult | UpstreamError:
        """One transaction on a pooled connection: the relay's answer, or the UpstreamError
        that broke the session (returned, not raised: the dispatcher classifies both).

        A reused connection that turns out to be dead at MAIL (the upstream closed
        it while idle) is not the upstream's fault: retry once on a fresh one.
        """
        pool = self.pool
        for attempt in (1, 2):
            conn = pool.acquire_idle()
            if conn is None:
                try:
                    conn = await pool.acquire()  # opens a session: may break too
                except UpstreamError as exc:
                    return exc
            reused = conn.messages > 0
            completed = False
            try:
                result = await conn.send(
                    mail_from,
                    rcpts,
                    body,
                    smtputf8=smtputf8,
                    body_8bit=body_8bit,
                    crlf_clean=crlf_clean,
                )
                completed = True
                return result
            except UpstreamError as exc:
                if not (attempt == 1 and reused and exc.stage == "mail" and exc.code is None):
                    return exc
            finally:
                pool.release(conn, completed=completed)
        raise AssertionError("unreachable")

    def update(
        self, cfg: UpstreamConfig, policy: BreakerPolicy, *, local_hostname: str, timeout_s: float
    ) -> None:
        """A reload kept this upstream: new weight and limits; breaker, pool and counters stay."""
        old, self.config = self.config, cfg
        if cfg.pool != old.pool:
            metrics.UPSTREAM_INFO.remove(self.name, old.pool)
            metrics.UPSTREAM_INFO.labels(self.name, cfg.pool).set(1)
        if cfg.weight != old.weight:  # an operator's runtime weight stands until the file changes
            self.weight = cfg.weight
        self.breaker.retune(policy)
        self.local_hostname, self.timeout_s = local_hostname, timeout_s
        self.pool.resize(cfg.max_connections, cfg.max_messages_per_connection)
        now = self._clock.monotonic()
        if cfg.rate_per_s != old.rate_per_s:
            rate = cfg.rate_per_s
            self.bucket = TokenBucket(rate, now=now) if rate else None
            self.aimd = Aimd(rate) if rate else None
            self.metrics.effective_rate.set(rate or math.inf)
        if cfg.daily_quota != old.daily_quota:
            used = self.quota.used(now) if self.quota is not None else 0
            self.quota = RollingQuota(cfg.daily_quota) if cfg.daily_quota else None
            if self.quota is not None and used:
                self.quota.record(now, used)  # counted as of now: errs on the safe side

    def retire(self, still_named: Callable[[str], bool]) -> None:
        """Removed or replaced by a reload: never selected again; leases finish, idle ones QUIT.

        Once the last lease is back, a name no longer in the pool loses its metric
        series (a replaced upstream shares them with its successor, so they stay).
        """
        spawn(self._close_and_forget(still_named), name=f"pool-retire:{self.name}")

    async def _close_and_forget(self, still_named: Callable[[str], bool]) -> None:
        await self.pool.close()
        if not still_named(self.name):
            metrics.forget_upstream(self.name, _STATES, self.config.pool)


class Pick(NamedTuple):  # a tuple: one per attempt, the cheapest value to build
    """The upstream chosen for one attempt, and the breaker ticket to report back with."""

    upstream: Upstream
    ticket: int


@dataclass(frozen=True, slots=True)
class Reconfigured:
    """What a reload did to the upstreams, by name."""

    kept: tuple[str, ...]  # same object: breaker, pool and counters survive
    rebuilt: tuple[str, ...]  # added, or connection settings changed: a fresh Upstream
    removed: tuple[str, ...]  # retired: never selected again, in-flight work finishes


def _connection(cfg: UpstreamConfig) -> tuple[object, ...]:
    """The settings a pooled session was opened with: any change needs a new pool."""
    return (cfg.endpoint, cfg.tls, cfg.tls_verify, cfg.tls_ca, cfg.username, cfg.password)


class Registry:
    def __init__(
        self,
        upstreams: Sequence[UpstreamConfig],
        breaker: BreakerConfig,
        clock: Clock,
        *,
        local_hostname: str,
        timeout_s: float,
        rng: random.Random | None = None,
        pools: Sequence[PoolConfig] = (),
    ) -> None:
        self._clock = clock
        self._set_pools(upstreams, pools)
        rand = self._rand = (rng or random.Random()).random
        self._by_name = {
            u.name: Upstream(
                u, breaker, clock, local_hostname=local_hostname, timeout_s=timeout_s, rand=rand
            )
            for u in upstreams
        }
        self._plain: dict[str, tuple[Upstream, ...]] = {}
        self._index_pools()
        self._selection = SmoothWeighted()
        self.on_recovery: Callable[[], None] = lambda: None
        # (upstream, new breaker state, reason): the app turns these into incident events
        self.on_breaker: Callable[[Upstream, str, str], None] = lambda u, state, why: None

    def __repr__(self) -> str:
        return f"<Registry {' '.join(repr(u) for u in self._by_name.values())}>"

    def __getitem__(self, name: str) -> Upstream:
        return self._by_name[name]

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self._by_name.values())

    def _set_pools(self, upstreams: Sequence[UpstreamConfig], pools: Sequence[PoolConfig]) -> None:
        names = list(dict.fromkeys(u.pool for u in upstreams))
        self._pools = frozenset(names)
        self._spill = {p.name: p.spill for p in pools if p.spill is not None}
        self.fallback_pool = fallback_pool(names)

    def _index_pools(self) -> None:
        """Per pool, its primaries if none of them has a rate limit or a daily quota: what
        `choose` may pick from directly while all of them are steady. Rebuilt whenever
        `_by_name` or the pools change (construction, reload), the only times a primary
        can gain or lose a limit."""
        plain: dict[str, tuple[Upstream, ...]] = {}
        for pool in self._pools:
            primaries = tuple(
                u for u in self._by_name.values() if u.config.pool == pool and not u.config.backup
            )
            if primaries and all(u.bucket is None and u.quota is None for u in primaries):
                plain[pool] = primaries
        self._plain = plain

    def pool_of(self, pool: str) -> str:
        """The pool that serves mail spooled for `pool` (a removed pool's mail: the fallback)."""
        return pool if pool in self._pools else self.fallback_pool

    def choose(self, now: float, avoid: frozenset[str], pool: str = DEFAULT_POOL) -> Pick | Choice:
        """An upstream of `pool` for the next attempt (token and quota taken, breaker told),
        or why not. A pool with nothing eligible spills into its `spill` pool, if set."""
        pool = pool if pool in self._pools else self.fallback_pool
        primaries = self._plain.get(pool)
        if primaries is not None and not avoid:
            # The steady state, decided without a Candidate each: when every primary is
            # healthy, in service, closed, weighted and past its slow start, the tier is
            # all of them, each at its full weight and ready (no rate limit, no quota), so
            # SmoothWeighted picks among them exactly as `_choose_in` would have it do.
            for u in primaries:
                if not (
                    u.healthy
                    and u.breaker.closed
                    and not u.drained
                    and u.weight > 0
                    and now - u.in_service_since >= u.config.slow_start_s
                ):
                    break
            else:
                chosen = self._selection.pick_one(primaries)
                if chosen is not None:
                    ticket, change = chosen.breaker.begin(now)
                    if change is not None:
                        self._log(chosen, change)
                    return Pick(chosen, ticket)
        choice = self._choose_in(pool, now, avoid)
        spill = self._spill.get(pool)
        if choice.outcome is Outcome.NONE_ELIGIBLE and spill is not None:
            choice = self._choose_in(spill, now, avoid)
        if not choice.name:
            return choice
        upstream = self._by_name[choice.name]
        if upstream.bucket is not None:
            upstream.bucket.take(now)
        if upstream.quota is not None:
            upstream.quota.record(now)
        ticket, change = upstream.breaker.begin(now)
        self._log(upstream, change)
        return Pick(upstream, ticket)

    def _choose_in(self, pool: str, now: float, avoid: frozenset[str]) -> Choice:
        candidates = [u.candidate(now) for u in self._by_name.values() if u.config.pool == pool]
        return self._selection.choose(candidates, now, avoid)

    def next_opening(self, now: float) -> float | None:
        """The earliest future time a healthy upstream that cannot take mail now might.

        Unhealthy upstreams are left out: their recovery is announced by the health
        checker (on_recovery). Times already past are left out too: a timer for them
        would fire at once and spin.
        """
        times = []
        for u in self._by_name.values():
            if not u.healthy:
                continue
            if (t := u.breaker.retry_at()) is not None and t > now:
                times.append(t)
            if u.quota is not None and u.quota.exhausted(now):
                times.append(u.quota.frees_at(now))
        return min(times) if times else None

    def record(self, pick: Pick, signal: Signal, reason: str) -> None:
        """What the attempt said about the upstream: feeds its breaker and rate controller."""
        if signal is Signal.SUCCESS:
            self.record_success(pick)
            return
        upstream, now = pick.upstream, self._clock.monotonic()
        if signal in (Signal.FAILURE, Signal.THROTTLED):
            self._log(upstream, upstream.breaker.record_failure(now, reason, pick.ticket))
            aimd = upstream.aimd
            if signal is Signal.THROTTLED and aimd is not None and aimd.on_throttle(now):
                log.warning(
                    "upstream.throttled upstream=%s effective_rate=%.2f/s reason=%s",
                    upstream.name,
                    aimd.effective,
                    reason,
                )
                self._set_rate(upstream, now)

    def record_success(self, pick: Pick, now: float | None = None) -> None:
        """`record` for Signal.SUCCESS (the common case); `now` if the caller just read it."""
        upstream = pick.upstream
        if now is None:
            now = self._clock.monotonic()
        change = upstream.breaker.record_success(now, pick.ticket)
        if change is not None:  # closed again: back in service, ramping up
            self._log(upstream, change)
            upstream.in_service_since = now
            self.on_recovery()
        if upstream.aimd is not None and upstream.aimd.on_success():
            self._set_rate(upstream, now)

    def set_drained(self, name: str, drained: bool) -> bool:
        """Take an upstream out of rotation (in-flight work finishes) or put it back."""
        upstream = self._by_name.get(name)
        if upstream is None:
            return False
        if upstream.drained is not drained:
            upstream.drained = drained
            log.warning("upstream.drained upstream=%s drained=%s", name, drained)
            if not drained:
                upstream.in_service_since = self._clock.monotonic()
                self.on_recovery()
        return True

    def set_weight(self, name: str, weight: int) -> bool:
        upstream = self._by_name.get(name)
        if upstream is None:
            return False
        log.warning("upstream.weight upstream=%s weight=%d was=%d", name, weight, upstream.weight)
        upstream.weight = weight
        if weight > 0:
            self.on_recovery()  # it may be the first eligible upstream again
        return True

    def eligible_count(self, now: float) -> int:
        return sum(
            1 for u in self._by_name.values() if (c := u.candidate(now)).eligible and c.weight > 0
        )

    def status(self, now: float) -> list[dict[str, object]]:
        """A JSON-able snapshot per upstream for /status."""
        return [
            {
                "name": u.name,
                "pool": u.config.pool,
                "address": u.config.endpoint,
                "weight": u.weight,
                "backup": u.config.backup,
                "healthy": u.healthy,
                "drained": u.drained,
                "breaker": str(u.breaker.state),
                "breaker_open_for_s": round(u.breaker.open_for_s, 1),
                "connections": u.pool.size,
                "effective_rate_per_s": u.effective_rate,
                "daily_quota_used": u.quota.used(now) if u.quota is not None else None,
                "eligible": u.candidate(now).eligible,
            }
            for u in self._by_name.values()
        ]

    def abandon(self, pick: Pick) -> None:
        """The attempt sent nothing (body unreadable, cancelled): no verdict on the relay.

        An abandoned half-open probe frees the slot: mail parked while it was in flight
        waits for its outcome (no timer), so it is told the upstream may be tried again."""
        if pick.upstream.breaker.abandon(pick.ticket):
            self.on_recovery()

    def on_health(self, name: str, healthy: bool, reason: str) -> None:
        """The active health check flipped: the health checker already logged it."""
        upstream = self._by_name.get(name)
        if upstream is None or upstream.healthy is healthy:
            return
        upstream.healthy = healthy
        if healthy:
            now = self._clock.monotonic()
            upstream.in_service_since = now
            self._log(upstream, upstream.breaker.expedite(now, "health check passed"))
            self.on_recovery()

    def _set_rate(self, upstream: Upstream, now: float) -> None:
        assert upstream.aimd is not None and upstream.bucket is not None
        upstream.bucket.set_rate(upstream.aimd.effective, now)
        upstream.metrics.effective_rate.set(upstream.aimd.effective)

    def _log(self, upstream: Upstream, change: Transition | None) -> None:
        if change is None:
            return
        level = logging.WARNING if change.new is BreakerState.OPEN else logging.INFO
        log.log(
            level,
            "upstream.breaker upstream=%s %s->%s reason=%s",
            upstream.name,
            change.old,
            change.new,
            change.reason,
        )
        if self._by_name.get(upstream.name) is upstream:  # not a retired one finishing work
            metrics.set_breaker_state(upstream.name, change.new.value, _STATES)
            self.on_breaker(upstream, str(change.new), change.reason)

    def reconfigure(
        self,
        configs: Sequence[UpstreamConfig],
        breaker: BreakerConfig,
        *,
        local_hostname: str,
        timeout_s: float,
        pools: Sequence[PoolConfig] = (),
    ) -> Reconfigured:
        """A reload: build every new upstream first, then swap the map in one assignment.

        An upstream whose connection settings are unchanged is kept (breaker, pool,
        counters, health) and gets its new weight and limits; one whose endpoint, TLS
        or credentials changed gets a fresh Upstream and pool, and the old one retires
        like a removed one. Raises (OSError, ssl.SSLError) before anything changed if
        a new TLS context cannot be built.
        """
        current = self._by_name
        securities = {
            c.name: Security.of(c)  # the only step that can fail: done before any change
            for c in configs
            if (old := current.get(c.name)) is None or _connection(old.config) != _connection(c)
        }
        policy = BreakerPolicy(
            breaker.failure_threshold, breaker.open_for_s, breaker.max_open_for_s
        )
        nxt: dict[str, Upstream] = {}
        for cfg in configs:
            kept = current.get(cfg.name)
            if kept is not None and cfg.name not in securities:
                kept.update(cfg, policy, local_hostname=local_hostname, timeout_s=timeout_s)
                nxt[cfg.name] = kept
                continue
            nxt[cfg.name] = Upstream(
                cfg,
                breaker,
                self._clock,
                local_hostname=local_hostname,
                timeout_s=timeout_s,
                rand=self._rand,
                security=securities[cfg.name],
            )
        retired = [u for name, u in current.items() if nxt.get(name) is not u]
        self._by_name = nxt  # readers see the old map or the new one, never a mix
        self._set_pools(configs, pools)
        self._index_pools()
        for upstream in retired:
            upstream.retire(lambda name: name in self._by_name)
        self.on_recovery()  # added or re-weighted upstreams may take parked mail now
        return Reconfigured(
            kept=tuple(n for n in nxt if n not in securities),
            rebuilt=tuple(securities),
            removed=tuple(n for n in current if n not in nxt),
        )

    async def close(self) -> None:
        for upstream in self._by_name.values():
            await upstream.pool.close()
