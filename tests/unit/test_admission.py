"""Specification of front-end admission: never an open relay, bounded recipients, safe names."""

from __future__ import annotations

import ipaddress

import pytest

from smtpbalancer import replies
from smtpbalancer.config import Network
from smtpbalancer.frontend.admission import (
    Limits,
    has_control_chars,
    may_relay,
    on_rcpt,
    trace_name,
)
from smtpbalancer.replies import Reply


def nets(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize(
    ("client_ip", "networks", "allowed"),
    [
        ("127.0.0.1", ("127.0.0.0/8",), True),
        ("127.255.0.9", ("127.0.0.0/8",), True),
        ("127.0.0.2", ("127.0.0.1/32",), False),
        ("127.0.0.1", ("127.0.0.1/32",), True),
        ("10.1.2.3", ("127.0.0.0/8", "10.0.0.0/8"), True),
        ("192.0.2.1", ("127.0.0.0/8", "10.0.0.0/8"), False),
        ("::1", ("::1/128",), True),
        ("::2", ("::1/128",), False),
        ("::1", ("127.0.0.0/8",), False),
        ("127.0.0.1", ("::1/128",), False),
        ("::ffff:127.0.0.1", ("127.0.0.0/8",), True),  # IPv4-mapped on a dual-stack socket
        ("::ffff:192.0.2.1", ("127.0.0.0/8",), False),
        ("fe80::1%eth0", ("fe80::/10",), True),  # link-local with a zone id
        ("2001:db8::7", ("2001:db8::/32",), True),
        ("garbage", ("0.0.0.0/0", "::/0"), False),
        ("", ("0.0.0.0/0", "::/0"), False),
        ("127.0.0.1", (), False),
    ],
)
def test_may_relay(client_ip: str, networks: tuple[str, ...], allowed: bool) -> None:
    assert may_relay(client_ip, nets(*networks)) is allowed


LIMITS = Limits(max_recipients=3, allow_networks=nets("127.0.0.0/8"))


@pytest.mark.parametrize(
    ("client_ip", "so_far", "reply"),
    [
        ("127.0.0.1", 0, None),
        ("127.0.0.1", 2, None),
        ("127.0.0.1", 3, replies.TOO_MANY_RECIPIENTS),
        ("127.0.0.1", 50, replies.TOO_MANY_RECIPIENTS),
        ("192.0.2.1", 0, replies.RELAY_DENIED),
        ("192.0.2.1", 3, replies.RELAY_DENIED),  # relay denial comes first
    ],
)
def test_on_rcpt(client_ip: str, so_far: int, reply: Reply | None) -> None:
    assert on_rcpt(LIMITS, client_ip, so_far) == reply


def test_the_rcpt_refusals_are_the_rfc_ones() -> None:
    assert replies.RELAY_DENIED.line == "554 5.7.1 Relay access denied"
    assert replies.TOO_MANY_RECIPIENTS.line == "452 4.5.3 Too many recipients"


@pytest.mark.parametrize(
    ("text", "has"),
    [
        ("bob@example.net", False),
        ("jörg@bücher.example", False),
        ("", False),
        ("bob@example.net\r\nRCPT TO:<x@y>", True),
        ("a\nb", True),
        ("a\rb", True),
        ("a\x00b", True),
        ("a\tb", True),
        ("a\x1bb", True),
        ("a\x7fb", True),
    ],
)
def test_has_control_chars(text: str, has: bool) -> None:
    assert has_control_chars(text) is has


@pytest.mark.parametrize(
    ("helo", "name"),
    [
        (None, "unknown"),
        ("", "unknown"),
        ("mail.example.test", "mail.example.test"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        ("my_host-1", "my_host-1"),
        ("evil\r\nX-Injected: yes", "evil??X-Injected:?yes"),
        ("two words", "two?words"),
        ("héllo", "h?llo"),
        ("x" * 300, "x" * 255),
    ],
)
def test_trace_name_is_safe_for_a_received_header(helo: str | None, name: str) -> None:
    assert trace_name(helo) == name
