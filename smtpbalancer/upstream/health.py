"""Active health checks: one probe loop per upstream, flips reported through a callback.

HealthTracker is the pure part (no I/O, no clock): `fall` consecutive failed probes
mark an upstream down, `rise` consecutive good ones mark it up again. It starts up,
so traffic flows until probes say otherwise.

HealthChecker is the shell. It probes every `interval_s` (more often while an
upstream is down, so recovery is noticed quickly), sleeps through the injected
Clock, and calls `on_change(name, healthy, reason)` once per flip; the caller
wires that to breakers, selection and metrics. A probe loop never raises: probe
errors are outcomes and a failing callback is logged. Probes start in run(),
never in the constructor.

smtp_probe is the standard probe: connect, 220 greeting, EHLO, QUIT through
UpstreamConnection (the only aiosmtplib user), all within one deadline. Given the
upstream's Security it also does its TLS (STARTTLS or implicit, verified the same
way), so a relay whose certificate would fail delivery also fails its probe; it
never sends AUTH.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Final, TypeAlias

from smtpbalancer.clock import Clock
from smtpbalancer.errors import UpstreamError
from smtpbalancer.tasks import cancel_and_wait, spawn
from smtpbalancer.upstream.connection import PLAINTEXT, Security, UpstreamConnection

log = logging.getLogger(__name__)

Probe: TypeAlias = Callable[[], Awaitable[None]]  # raises on failure
OnChange: TypeAlias = Callable[[str, bool, str], None]  # (upstream, healthy, reason)

MIN_DOWN_INTERVAL_S: Final = 0.2


class HealthTracker:
    """`fall` consecutive failures mark an upstream down, `rise` consecutive successes up."""

    def __init__(self, fall: int, rise: int) -> None:
        if fall < 1 or rise < 1:
            raise ValueError(f"health: fall and rise must be at least 1, got {fall} and {rise}")
        self._fall = fall
        self._rise = rise
        self._healthy = True
        self._failures = 0  # consecutive, reset by a success
        self._successes = 0  # consecutive, reset by a failure

    def __repr__(self) -> str:
        state = "up" if self._healthy else "down"
        return (
            f"<HealthTracker {state} failures={self._failures} successes={self._successes}"
            f" fall={self._fall} rise={self._rise}>"
        )

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def failures(self) -> int:
        """Consecutive failed probes so far (0 after a success)."""
        return self._failures

    def record(self, ok: bool) -> bool | None:
        """Count one probe; return the new health if it flipped, else None."""
        if ok:
            self._failures, self._successes = 0, self._successes + 1
            flips = not self._healthy and self._successes >= self._rise
        else:
            self._failures, self._successes = self._failures + 1, 0
            flips = self._healthy and self._failures >= self._fall
        if not flips:
            return None
        self._healthy = not self._healthy
        return self._healthy


def smtp_probe(
    host: str,
    port: int,
    *,
    local_hostname: str,
    timeout_s: float,
    security: Security = PLAINTEXT,
) -> Probe:
    """A probe that connects, reads the 220 greeting, sends EHLO [, STARTTLS] and QUITs.

    Raises UpstreamError on any failure, including the deadline.
    """
    name = f"{host}:{port}"
    security = security.without_credentials()

    async def probe() -> None:
        conn = UpstreamConnection(
            name, host, port, local_hostname=local_hostname, timeout_s=timeout_s, security=security
        )
        try:
            async with asyncio.timeout(timeout_s):
                await conn.open()  # connect + greeting + EHLO; raises UpstreamError
                await conn.close()  # QUIT
        except TimeoutError:
            raise UpstreamError(
                name, "probe", f"no complete exchange within {timeout_s:g}s"
            ) from None
        finally:
            if conn.usable:
                # Cut off mid-exchange: drop the socket without a QUIT nobody would answer.
                conn.broken = True
                await conn.close()

    return probe


class HealthChecker:
    """One probe loop per upstream; `on_change` is called whenever an upstream's health flips."""

    def __init__(
        self,
        probes: Mapping[str, Probe],
        *,
        interval_s: float,
        fall: int,
        rise: int,
        on_change: OnChange,
        clock: Clock,
    ) -> None:
        if not interval_s > 0.0:
            raise ValueError(f"health: interval_s must be positive, got {interval_s}")
        self._probes = dict(probes)
        self._trackers = {name: HealthTracker(fall, rise) for name in self._probes}
        self._fall, self._rise = fall, rise
        self._set_interval(interval_s)
        self._on_change = on_change
        self._clock = clock
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._running = False

    def _set_interval(self, interval_s: float) -> None:
        self._interval_s = interval_s
        # Faster while down so recovery is noticed quickly, but never slower than while up.
        self._down_interval_s = min(interval_s, max(MIN_DOWN_INTERVAL_S, interval_s / 2))

    def __repr__(self) -> str:
        parts = " ".join(f"{name}={_describe(t)}" for name, t in self._trackers.items())
        return f"<HealthChecker {parts}>" if parts else "<HealthChecker>"

    def healthy(self, name: str) -> bool:
        """Current health of upstream `name`; KeyError if it is not checked."""
        return self._trackers[name].healthy

    async def run(self) -> None:
        """Run every probe loop until cancelled (the set changes with `reconfigure`)."""
        self._running = True
        for name in self._probes:
            self._start(name)
        try:
            await asyncio.Event().wait()
        finally:
            self._running = False
            loops, self._loops = list(self._loops.values()), {}
            await cancel_and_wait(loops)

    def reconfigure(
        self,
        probes: Mapping[str, Probe],
        *,
        fresh: Collection[str],
        interval_s: float,
        fall: int,
        rise: int,
    ) -> None:
        """A reload: probe added upstreams, stop probing removed ones.

        Names in `fresh` (added, or rebuilt with a new endpoint or TLS) start over with a
        new tracker, as their new Upstream starts healthy. Kept upstreams keep their
        tracker and loop; their probe is replaced and `interval_s` applies from the next
        sleep. `fall`/`rise` changes apply to fresh trackers only.
        """
        for name in list(self._trackers):
            if name not in probes or name in fresh:
                del self._trackers[name]
                if (task := self._loops.pop(name, None)) is not None:
                    task.cancel()
        self._probes = dict(probes)
        self._set_interval(interval_s)
        self._fall, self._rise = fall, rise
        for name in self._probes:
            if name not in self._trackers:
                self._trackers[name] = HealthTracker(self._fall, self._rise)
                if self._running:
                    self._start(name)

    def _start(self, name: str) -> None:
        self._loops[name] = spawn(self._loop(name), name=f"health:{name}")

    async def _loop(self, name: str) -> None:
        tracker = self._trackers[name]
        while True:
            failure = await _attempt(self._probes[name])
            change = tracker.record(failure is None)
            if change is not None:
                self._announce(name, change, failure)
            await self._clock.sleep(self._interval_s if tracker.healthy else self._down_interval_s)

    def _announce(self, name: str, healthy: bool, failure: str | None) -> None:
        if healthy:
            reason = "probes succeeded"
            log.info("upstream.health upstream=%s healthy=%s reason=%s", name, healthy, reason)
        else:
            reason = f"probes failed, last: {failure}"
            log.warning("upstream.health upstream=%s healthy=%s reason=%s", name, healthy, reason)
        try:
            self._on_change(name, healthy, reason)
        except Exception:
            log.exception("upstream.health_callback_failed upstream=%s", name)


async def _attempt(probe: Probe) -> str | None:
    """Run one probe; None if it passed, else why it failed."""
    try:
        await probe()
    except UpstreamError as exc:
        return f"{exc.stage}: {exc.reason}"
    except Exception as exc:  # a probe's failure is an outcome, never the loop's end
        text = " ".join(str(exc).split())[:200]
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return None


def _describe(tracker: HealthTracker) -> str:
    state = "up" if tracker.healthy else "down"
    return f"{state}({tracker.failures})" if tracker.failures else state
