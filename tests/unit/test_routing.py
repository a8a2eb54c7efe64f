"""Routing rules, header reading and the dedupe memory: pure logic, table-driven."""

from __future__ import annotations

import pytest

from smtpbalancer import headers
from smtpbalancer.config import RouteConfig
from smtpbalancer.frontend.dedupe import DedupeWindow, body_digest, recipient_key
from smtpbalancer.frontend.routing import Router

MESSAGE = (
    b"From: a@b.test\r\nX-Pool:\r\n  transactional\r\nSubject: hi\r\n"
    b"X-Campaign-ID: spring-42\r\n\r\nX-Pool: marketing\r\nbody\r\n"
)

ROUTER = Router(
    [
        RouteConfig(pool="tx", header_name="X-Pool", header_value="trans*"),
        RouteConfig(pool="vip", user="vip-*"),
        RouteConfig(pool="alerts", sender="*@alerts.brand.example"),
        RouteConfig(pool="eu", recipient_domain="*.eu"),
    ],
    fallback_pool="marketing",
)


@pytest.mark.parametrize(
    ("sender", "rcpts", "user", "message", "pool"),
    [
        ("x@y.test", ["r@z.test"], None, MESSAGE, "tx"),  # folded header value, glob
        ("x@y.test", ["r@z.test"], "vip-1", b"Subject: s\r\n\r\nX-Pool: trans\r\n", "vip"),
        ("Ops@ALERTS.brand.example", ["r@z.test"], None, b"\r\n", "alerts"),
        ("x@y.test", ["a@shop.eu", "b@news.eu"], None, b"\r\n", "eu"),
        ("x@y.test", ["a@shop.eu", "b@news.com"], None, b"\r\n", "marketing"),  # not every rcpt
        ("x@y.test", ["r@z.test"], None, b"Subject: s\r\n\r\n", "marketing"),
    ],
)
def test_first_matching_route_wins_else_the_fallback(
    sender: str, rcpts: list[str], user: str | None, message: bytes, pool: str
) -> None:
    assert ROUTER.route(sender=sender, rcpts=rcpts, user=user, message=message).pool == pool


def test_the_routing_header_is_stripped_with_its_continuation_lines_only() -> None:
    decision = ROUTER.route(sender="x@y.test", rcpts=["r@z.test"], user=None, message=MESSAGE)
    assert decision.strip_header == "X-Pool"
    stripped = headers.remove(MESSAGE, "x-pool")
    assert stripped == (
        b"From: a@b.test\r\nSubject: hi\r\nX-Campaign-ID: spring-42\r\n\r\n"
        b"X-Pool: marketing\r\nbody\r\n"  # a body line that looks like a header stays
    )
    keep = Router([RouteConfig(pool="tx", header_name="X-Pool", keep_header=True)], "m")
    assert keep.route(sender="", rcpts=["r@z"], user=None, message=MESSAGE).strip_header is None


def test_header_values_are_read_case_insensitively_from_the_header_section_only() -> None:
    assert headers.first(MESSAGE, "x-campaign-id") == "spring-42"
    assert headers.first(MESSAGE, "X-Pool") == "transactional"
    assert headers.first(MESSAGE, "Message-ID") is None
    assert headers.values(MESSAGE, ("X-Campaign-ID", "X-Missing")) == {"X-Campaign-ID": "spring-42"}
    assert headers.values(MESSAGE, ("Subject", "subject")) == {"Subject": "hi", "subject": "hi"}


def test_dedupe_remembers_per_recipient_for_the_window_and_within_its_bound() -> None:
    window = DedupeWindow(window_s=600, max_entries=3)
    digest = body_digest(b"body")
    a, b = recipient_key("<m@x>", "a@r", digest), recipient_key("<m@x>", "B@r", digest)
    assert window.repeats([a, b], now=0) == [None, None]
    window.remember([a, b], now=0, queue_id="Q1")
    assert window.repeats([a, recipient_key("<m@x>", "b@r", digest)], now=599) == ["Q1", "Q1"]
    assert window.repeats([recipient_key("<m@x>", "a@r", body_digest(b"other"))], now=1) == [None]
    assert window.repeats([a], now=601) == [None], "forgotten after the window"
    window.remember([recipient_key(str(i), "r", digest) for i in range(5)], now=700, queue_id="Q")
    assert len(window) == 3, "the oldest are forgotten past max_entries"
