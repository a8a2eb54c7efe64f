"""LoopCounter and LoopHistogram export exactly what prometheus-client's Counter and
Histogram would, for the same operations: same names, HELP and TYPE lines, labels,
bucket bounds, values and order, with and without series removed."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from smtpbalancer import metrics
from smtpbalancer.metrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Bounds themselves (an observation equal to a bound is counted in it), between them,
# below the first, above the last, zero, and a negative one.
OBSERVED = (0.0, 0.001, 0.0011, 0.0025, 0.003, 1, 1.0000001, 2.5, 59.9, 60, 61, 1e9, -0.5)


def registries() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(), CollectorRegistry()


def test_a_loop_counter_exports_what_a_client_counter_does() -> None:
    client_reg, loop_reg = registries()
    client = Counter(
        "x_delivered", "Help text, with a \\ and\na newline.", ["upstream"], registry=client_reg
    )
    loop = LoopCounter(
        "x_delivered", "Help text, with a \\ and\na newline.", ["upstream"], registry=loop_reg
    )
    assert generate_latest(client_reg) == generate_latest(loop_reg)  # no series yet
    for family in (client, loop):
        family.labels("b").inc()
        family.labels("a").inc(2)
        family.labels("a").inc()
        family.labels('q"uote').inc(0.5)
    assert generate_latest(client_reg) == generate_latest(loop_reg)
    for family in (client, loop):
        family.remove("b")
    assert generate_latest(client_reg) == generate_latest(loop_reg)
    assert b'x_delivered_total{upstream="a"} 3.0' in generate_latest(loop_reg)


def test_a_loop_counter_with_two_labels() -> None:
    client_reg, loop_reg = registries()
    client = Counter("x_attempts", "Attempts.", ["upstream", "outcome"], registry=client_reg)
    loop = LoopCounter("x_attempts", "Attempts.", ["upstream", "outcome"], registry=loop_reg)
    for family in (client, loop):
        family.labels("u", "answered").inc()
        family.labels("u", "session_failed").inc()
        family.labels("u", "answered").inc()
    assert generate_latest(client_reg) == generate_latest(loop_reg)
    with pytest.raises(ValueError):
        loop.labels("u")
    with pytest.raises(KeyError):
        loop.remove("v", "answered")


def test_a_loop_histogram_exports_what_a_client_histogram_does() -> None:
    client_reg, loop_reg = registries()
    client = Histogram("x_seconds", "Time.", ["upstream"], buckets=BUCKETS, registry=client_reg)
    loop = LoopHistogram("x_seconds", "Time.", ["upstream"], buckets=BUCKETS, registry=loop_reg)
    assert generate_latest(client_reg) == generate_latest(loop_reg)
    for family in (client, loop):
        family.labels("idle")  # bound, never observed: all zeros
        for value in OBSERVED:
            family.labels("busy").observe(value)
    assert generate_latest(client_reg) == generate_latest(loop_reg)
    for family in (client, loop):
        family.remove("idle")
    assert generate_latest(client_reg) == generate_latest(loop_reg)


def test_a_loop_histogram_with_infinity_given_and_one_bucket() -> None:
    client_reg, loop_reg = registries()
    client = Histogram("x_h", "H.", ["u"], buckets=(1, math.inf), registry=client_reg)
    loop = LoopHistogram("x_h", "H.", ["u"], buckets=(1, math.inf), registry=loop_reg)
    for family in (client, loop):
        for value in (0.5, 1, 2, math.inf):
            family.labels("a").observe(value)
    assert generate_latest(client_reg) == generate_latest(loop_reg)
    with pytest.raises(ValueError):
        LoopHistogram("x_bad", "H.", ["u"], buckets=(2, 1), registry=None)


def test_the_delivery_families_are_loop_families_in_the_default_registry() -> None:
    # Names, labels and buckets as they always were; the scenario test_metrics checks a
    # live proxy's exposition.
    child = metrics.UpstreamMetrics("t-loop")
    try:
        child.answered(0.003)
        child.attempted(0.2, answered=False)
        child.delivered.inc()
        text = generate_latest().decode()
        assert 'smtpbalancer_messages_delivered_total{upstream="t-loop"} 1.0' in text
        assert (
            'smtpbalancer_delivery_attempts_total{outcome="answered",upstream="t-loop"} 1.0' in text
        )
        assert (
            'smtpbalancer_delivery_attempts_total{outcome="session_failed",'
            'upstream="t-loop"} 1.0' in text
        )
        assert (
            'smtpbalancer_delivery_duration_seconds_bucket{le="0.005",upstream="t-loop"} 1.0'
            in text
        )
        assert 'smtpbalancer_delivery_duration_seconds_count{upstream="t-loop"} 2.0' in text
    finally:
        metrics.forget_upstream("t-loop", (), "default")
    assert "t-loop" not in generate_latest().decode()
