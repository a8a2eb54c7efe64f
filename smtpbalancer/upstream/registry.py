"""The upstream pool as a whole: one Upstream (pool + breaker + metrics) per relay.

The shell around the pure policies: it asks the breakers who is eligible,
lets SmoothWeighted choose, turns every breaker Transition into one log line
and one metric, and notifies the dispatcher when an upstream becomes usable
again so parked mail moves at once instead of waiting for a timer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from smtpbalancer.clock import Clock
from smtpbalancer.config import BreakerConfig, UpstreamConfig
from smtpbalancer.errors import UpstreamError
from smtpbalancer.metrics import UpstreamMetrics, bind_connections_gauge, set_breaker_state
from smtpbalancer.replies import SendResult
from smtpbalancer.upstream.breaker import Breaker, BreakerPolicy, BreakerState, Transition
from smtpbalancer.upstream.connection import UpstreamConnection
from smtpbalancer.upstream.pool import Pool
from smtpbalancer.upstream.selection import Candidate, SmoothWeighted

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
    ) -> None:
        self.config = config
        self.name = config.name
        self.breaker = Breaker(
            BreakerPolicy(breaker_config.failure_threshold, breaker_config.open_for_s)
        )
        self.metrics = UpstreamMetrics(config.name)
        self.pool = Pool(
            config.name,
            lambda: UpstreamConnection(
                config.name,
                config.host,
                config.port,
                local_hostname=local_hostname,
                timeout_s=timeout_s,
            ),
            clock,
            max_connections=config.max_connections,
            max_messages=config.max_messages_per_connection,
        )
        set_breaker_state(self.name, BreakerState.CLOSED.value, _STATES)
        bind_connections_gauge(self.name, lambda: float(self.pool.size))

    def __repr__(self) -> str:
        return f"<Upstream {self.name} weight={self.config.weight} {self.breaker!r} {self.pool!r}>"

    def candidate(self, now: float) -> Candidate:
        return Candidate(
            self.name, self.config.weight, self.config.backup, self.breaker.eligible(now)
        )

    async def send(
        self, mail_from: str, rcpts: Sequence[str], body: bytes, *, smtputf8: bool, body_8bit: bool
    ) -> SendResult:
        """One transaction on a pooled connection. Raises UpstreamError if the session breaks.

        A reused connection that turns out to be dead at MAIL (the upstream closed
        it while idle) is not the upstream's fault: retry once on a fresh one.
        """
        for attempt in (1, 2):
            async with self.pool.lease() as conn:
                reused = conn.messages > 0
                try:
                    return await conn.send(
                        mail_from, rcpts, body, smtputf8=smtputf8, body_8bit=body_8bit
                    )
                except UpstreamError as exc:
                    if not (attempt == 1 and reused and exc.stage == "mail" and exc.code is None):
                        raise
        raise AssertionError("unreachable")


class Registry:
    def __init__(
        self,
        upstreams: Sequence[UpstreamConfig],
        breaker: BreakerConfig,
        clock: Clock,
        *,
        local_hostname: str,
        timeout_s: float,
    ) -> None:
        self._clock = clock
        self._by_name = {
            u.name: Upstream(u, breaker, clock, local_hostname=local_hostname, timeout_s=timeout_s)
            for u in upstreams
        }
        self._selection = SmoothWeighted()
        self.on_recovery: Callable[[], None] = lambda: None

    def __repr__(self) -> str:
        return f"<Registry {' '.join(repr(u) for u in self._by_name.values())}>"

    def __getitem__(self, name: str) -> Upstream:
        return self._by_name[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_name.values())

    def choose(self, now: float, avoid: frozenset[str]) -> Upstream | None:
        """The next upstream for a message, or None if every eligible one is in `avoid`."""
        candidates = [u.candidate(now) for u in self._by_name.values()]
        name = self._selection.choose(candidates, avoid)
        if name is None:
            return None
        upstream = self._by_name[name]
        self._log(upstream, upstream.breaker.begin(now))
        return upstream

    def any_eligible(self, now: float) -> bool:
        return any(u.breaker.eligible(now) and u.config.weight > 0 for u in self._by_name.values())

    def next_opening(self) -> float | None:
        """The earliest time an OPEN breaker will let a probe through."""
        times = [t for u in self._by_name.values() if (t := u.breaker.retry_at()) is not None]
        return min(times) if times else None

    def record_success(self, upstream: Upstream) -> None:
        change = upstream.breaker.record_success(self._clock.monotonic())
        self._log(upstream, change)
        if change is not None:
            self.on_recovery()

    def record_failure(self, upstream: Upstream, reason: str) -> None:
        self._log(upstream, upstream.breaker.record_failure(self._clock.monotonic(), reason))

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
        set_breaker_state(upstream.name, change.new.value, _STATES)

    async def close(self) -> None:
        for upstream in self._by_name.values():
            await upstream.pool.close()
