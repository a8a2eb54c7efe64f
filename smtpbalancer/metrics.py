"""Every Prometheus metric, defined once.

Children are bound once per upstream (`UpstreamMetrics`); the hot path calls
only `.inc()`/`.observe()`. Labels are bounded: upstream name and outcome,
never sender, recipient or domain. `_created` series are off.

The per-delivery families (delivered, deferred, attempts, duration) are
`LoopCounter`/`LoopHistogram`: children that are plain numbers, written by the
event loop alone (each worker is a process) and read by /metrics from its HTTP
thread. A prometheus-client child takes a lock and runs several Python calls per
`inc`/`observe`, four times per relayed message; these cost an addition. Their
exposition is the client's, line for line (tests/unit/test_loop_metrics.py).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Generic, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class LoopCount:
    """A counter child: a float that only the event loop adds to."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopObservations:
    """A histogram child: per-bucket counts (not cumulative) and the sum, loop-written."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds  # ascending, +Inf last
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount, as prometheus-client counts it.
        self.counts[bisect.bisect_left(self._bounds, amount)] += 1.0
        self.sum += amount


_C = TypeVar("_C", LoopCount, LoopObservations)


class _LoopFamily(Generic[_C]):
    """A labelled family of loop-written children; a collector in `registry`.

    `labels` and `remove` may run in any thread (they lock, as the client does); a
    child's `inc`/`observe` only ever in the event loop's.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _C] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name} series={len(self._children)}>"

    def labels(self, *values: str) -> _C:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name}: labels {self._labelnames}, got {values}")
            with self._lock:
                child = self._children.setdefault(values, self._child())
        return child

    def remove(self, *values: str) -> None:
        """Drop one series. Raises KeyError if it was never bound (as the client does)."""
        with self._lock:
            del self._children[values]

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        with self._lock:
            children = list(self._children.items())
        family = self._family()
        for values, child in children:
            self._add(family, values, child)
        return [family]

    def _child(self) -> _C:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def _add(self, family: Metric, values: tuple[str, ...], child: _C) -> None:
        raise NotImplementedError


class LoopCounter(_LoopFamily[LoopCount]):
    """prometheus_client.Counter's exposition, with loop-written children."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = prometheus_client.REGISTRY,
    ) -> None:
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> LoopCount:
        return LoopCount()

    def _family(self) -> Metric:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: Metric, values: tuple[str, ...], child: LoopCount) -> None:
        assert isinstance(family, CounterMetricFamily)
        family.add_metric(values, child.value)


class LoopHistogram(_LoopFamily[LoopObservations]):
    """prometheus_client.Histogram's exposition, with loop-written children."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = prometheus_client.REGISTRY,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds) or not bounds:
            raise ValueError(f"{name}: buckets must be in ascending order")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        self._les = tuple(floatToGoString(b) for b in bounds)  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> LoopObservations:
        return LoopObservations(self._bounds)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: Metric, values: tuple[str, ...], child: LoopObservations) -> None:
        assert isinstance(family, HistogramMetricFamily)
        cumulative = []
        count = 0.0
        for le, n in zip(self._les, list(child.counts), strict=True):
            count += n
            cumulative.append((le, count))
        family.add_metric(values, cumulative, child.sum)


BUILD_INFO = Gauge(
    "smtpbalancer_build_info", "Always 1; the labels say which build is running.", ["version"]
)
MESSAGES_REJECTED = Counter(
    "smtpbalancer_messages_rejected",
    "Client commands or connections refused by the front end, by reason.",
    ["reason"],
)
QUEUE_OLDEST_AGE = Gauge(
    "smtpbalancer_queue_oldest_message_age_seconds",
    "Age of the oldest message in the spool (0 when empty).",
)
SPOOL_FREE_BYTES = Gauge(
    "smtpbalancer_spool_free_bytes", "Free bytes on the spool's file system (last statvfs)."
)
SPOOL_MAX_BYTES = Gauge("smtpbalancer_spool_max_bytes", "The configured spool.max_size.")
CONFIG_GENERATION = Gauge(
    "smtpbalancer_config_generation", "Increments on every successful config (re)load."
)
CONFIG_RELOAD_FAILURES = Counter(
    "smtpbalancer_config_reload_failures", "Config reloads refused (the old config kept running)."
)
MESSAGES_RECEIVED = Counter(
    "smtpbalancer_messages_received", "Messages accepted (250) and spooled durably."
)
MESSAGES_DELIVERED = LoopCounter(
    "smtpbalancer_messages_delivered",
    "Messages with at least one recipient accepted by an upstream, per upstream.",
    ["upstream"],
)
MESSAGES_DEFERRED = LoopCounter(
    "smtpbalancer_messages_deferred",
    "Delivery attempts that left recipients to retry, per upstream.",
    ["upstream"],
)
MESSAGES_BOUNCED = Counter(
    "smtpbalancer_messages_bounced", "Messages with failed recipients for which a DSN was queued."
)
DELIVERY_ATTEMPTS = LoopCounter(
    "smtpbalancer_delivery_attempts",
    "Upstream transactions by outcome.",
    ["upstream", "outcome"],
)
DELIVERY_SECONDS = LoopHistogram(
    "smtpbalancer_delivery_duration_seconds",
    "Time for one upstream transaction (lease + MAIL..DATA).",
    ["upstream"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_MESSAGES = Gauge("smtpbalancer_queue_messages", "Messages in the spool.")
QUEUE_BYTES = Gauge("smtpbalancer_queue_bytes", "Body bytes in the spool.")
SESSIONS_ACTIVE = Gauge("smtpbalancer_sessions_active", "Open client SMTP sessions.")
UPSTREAM_CONNECTIONS = Gauge(
    "smtpbalancer_upstream_connections", "Open connections to an upstream.", ["upstream"]
)
UPSTREAM_CIRCUIT_STATE = Gauge(
    "smtpbalancer_upstream_circuit_state",
    "1 for the breaker's current state, 0 for the others.",
    ["upstream", "state"],
)
UPSTREAM_HEALTHY = Gauge(
    "smtpbalancer_upstream_healthy", "1 if the active health check passes, else 0.", ["upstream"]
)
UPSTREAM_EFFECTIVE_RATE = Gauge(
    "smtpbalancer_upstream_effective_rate",
    "Messages per second the upstream may get now (configured rate after AIMD; +Inf = no limit).",
    ["upstream"],
)
UPSTREAM_INFO = Gauge(
    "smtpbalancer_upstream_info",
    "Always 1; the pool label says which named pool the upstream serves (join on upstream).",
    ["upstream", "pool"],
)
DUPLICATES_SUPPRESSED = Counter(
    "smtpbalancer_duplicates_suppressed",
    "Recipients of resent messages acknowledged but not queued again ([dedupe] window).",
)
MESSAGES_ROUTED = Counter(
    "smtpbalancer_messages_routed",
    "Messages accepted, by the named pool their route chose.",
    ["pool"],
)
SPOOL_WRITE_ERRORS = Counter(
    "smtpbalancer_spool_write_errors", "Spool writes or fsyncs that failed (answered 451)."
)


CounterChild = Counter  # what .labels(...) returns: bind once, then .inc() on the hot path


class UpstreamMetrics:
    """Children bound once per upstream; the hot path calls .inc()/.observe() only."""

    __slots__ = (
        "attempt_broken",
        "attempt_ok",
        "deferred",
        "delivered",
        "effective_rate",
        "seconds",
    )

    def __init__(self, upstream: str) -> None:
        self.delivered = MESSAGES_DELIVERED.labels(upstream)
        self.deferred = MESSAGES_DEFERRED.labels(upstream)
        self.attempt_ok = DELIVERY_ATTEMPTS.labels(upstream, "answered")
        self.attempt_broken = DELIVERY_ATTEMPTS.labels(upstream, "session_failed")
        self.seconds = DELIVERY_SECONDS.labels(upstream)
        self.effective_rate = UPSTREAM_EFFECTIVE_RATE.labels(upstream)

    def answered(self, seconds: float) -> None:
        """One upstream transaction the upstream answered, and how long it took."""
        self.seconds.observe(seconds)
        self.attempt_ok.inc()

    def attempted(self, seconds: float, *, answered: bool) -> None:
        """One upstream transaction: answered, or the session failed."""
        self.seconds.observe(seconds)
        if answered:
            self.attempt_ok.inc()
        else:
            self.attempt_broken.inc()


def rejected(reason: str) -> None:
    """Count one refusal; `reason` comes from a fixed table in the front end (bounded)."""
    MESSAGES_REJECTED.labels(reason).inc()


def bind_gauges(
    queue_messages: Callable[[], float],
    queue_bytes: Callable[[], float],
    sessions: Callable[[], float],
) -> None:
    QUEUE_MESSAGES.set_function(queue_messages)
    QUEUE_BYTES.set_function(queue_bytes)
    SESSIONS_ACTIVE.set_function(sessions)


def bind_upstream_gauges(
    upstream: str, connections: Callable[[], float], healthy: Callable[[], float]
) -> None:
    UPSTREAM_CONNECTIONS.labels(upstream).set_function(connections)
    UPSTREAM_HEALTHY.labels(upstream).set_function(healthy)


def forget_upstream(upstream: str, states: tuple[str, ...], pool: str) -> None:
    """Drop every series labelled with a removed upstream, so dashboards stop showing it."""
    for family in (
        MESSAGES_DELIVERED,
        MESSAGES_DEFERRED,
        DELIVERY_SECONDS,
        UPSTREAM_CONNECTIONS,
        UPSTREAM_HEALTHY,
        UPSTREAM_EFFECTIVE_RATE,
    ):
        _remove(family, upstream)
    for outcome in ("answered", "session_failed"):
        _remove(DELIVERY_ATTEMPTS, upstream, outcome)
    for state in states:
        _remove(UPSTREAM_CIRCUIT_STATE, upstream, state)
    _remove(UPSTREAM_INFO, upstream, pool)


def _remove(
    family: Counter | Gauge | Histogram | LoopCounter | LoopHistogram, *labels: str
) -> None:
    with contextlib.suppress(KeyError):  # never bound (e.g. no delivery yet)
        family.remove(*labels)


def set_breaker_state(upstream: str, state: str, states: tuple[str, ...]) -> None:
    for s in states:
        UPSTREAM_CIRCUIT_STATE.labels(upstream, s).set(1.0 if s == state else 0.0)


def merge_workers(expositions: Mapping[str, str | None]) -> bytes:
    """One exposition from several workers' /metrics: each sample gains a `worker` label.

    A worker that did not answer (None) shows as smtpbalancer_worker_up 0. Sum over
    `worker` for counters and queue gauges; take the max for upstream_healthy.
    """
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "smtpbalancer_worker_up", "1 if the worker answered this scrape.", labels=["worker"]
    )
    for worker, text in expositions.items():
        up.add_metric([worker], 0.0 if text is None else 1.0)
        if text is None:
            continue
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "worker": worker}))
    return generate_latest(_Fixed([up, *families.values()]))


class _Fixed:
    """A collector that yields given families once (for generate_latest)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


# --- delivery events (events/outbox.py, events/webhook.py) ------------------------------

EVENTS_PENDING = Gauge(
    "smtpbalancer_events_pending",
    "Events in the durable outbox not yet accepted by the webhook, per outbox.",
    ["outbox"],
)
EVENTS_SENT = Counter(
    "smtpbalancer_events_sent", "Events the webhook accepted (2xx), per outbox.", ["outbox"]
)
EVENTS_DROPPED = Counter(
    "smtpbalancer_events_dropped",
    "Events lost unsent: the outbox was full (oldest dropped first) or could not be written.",
    ["outbox"],
)
WEBHOOK_FAILURES = Counter(
    "smtpbalancer_webhook_failures",
    "Webhook POSTs that failed and will be retried, by reason.",
    ["outbox", "reason"],
)
WEBHOOK_FAILURE_REASONS = ("connect", "timeout", "http_4xx", "http_5xx", "protocol")


class EventMetrics:
    """Children bound once per outbox ("delivery", "incident")."""

    __slots__ = ("dropped", "failures", "pending", "sent")

    def __init__(self, outbox: str) -> None:
        self.pending = EVENTS_PENDING.labels(outbox)
        self.sent = EVENTS_SENT.labels(outbox)
        self.dropped = EVENTS_DROPPED.labels(outbox)
        self.failures = {r: WEBHOOK_FAILURES.labels(outbox, r) for r in WEBHOOK_FAILURE_REASONS}
