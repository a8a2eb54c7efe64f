"""Specification of front-end admission: never an open relay, bounded recipients, safe names."""

from __future__ import annotations

import ipaddress

import pytest

from smtpbalancer import replies
from smtpbalancer.config import Network
from smtpbalancer.frontend.admission import (
    Limits,
    Pressure,
    declared_size,
    has_control_chars,
    may_relay,
    on_mail,
    on_rcpt,
    tarpit_delay,
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
        ("mail.example.test.", "mail.example.test."),
        ("evil\r\nX-Injected: yes", "unknown"),
        ("evil\nX-Injected: yes", "unknown"),
        ("two words", "unknown"),
        ("héllo", "unknown"),
        ("x" * 300, "unknown"),
        ("a..b", "unknown"),
        ("-a.test", "unknown"),
        ("[999.0.0.1]", "unknown"),
        ("[IPv6:192.0.2.1]", "unknown"),
        ("[192.0.2.1]\r\nX: y", "unknown"),
        ("[IPv6:fe80::1%\r\nX: y]", "unknown"),
    ],
)
def test_trace_name_is_safe_for_a_received_header(helo: str | None, name: str) -> None:
    assert trace_name(helo) == name


def pressure(
    spool: int = 0, reserved: int = 0, free: int = 10_000, floor: int = 0, max_spool: int = 1000
) -> Pressure:
    return Pressure(
        spool_bytes=spool,
        reserved_bytes=reserved,
        max_spool_bytes=max_spool,
        free_disk_bytes=free,
        min_free_disk_bytes=floor,
    )


@pytest.mark.parametrize(
    ("state", "declared", "reply"),
    [
        (pressure(), 0, None),
        (pressure(), 1000, None),  # exactly fills the spool: still fits
        (pressure(), 1001, replies.STORAGE_LOW),
        (pressure(spool=600), 400, None),
        (pressure(spool=600), 401, replies.STORAGE_LOW),
        (pressure(spool=600, reserved=300), 100, None),
        (pressure(spool=600, reserved=300), 101, replies.STORAGE_LOW),  # reservations count
        (pressure(spool=1000), 0, None),  # full, but no SIZE= declared: nothing to exceed
        (pressure(spool=1001), 0, replies.STORAGE_LOW),  # already over (a message without SIZE=)
        (pressure(free=99, floor=100), 0, replies.STORAGE_LOW),  # below the free-disk floor
        (pressure(free=100, floor=100), 0, None),
        (pressure(free=0, floor=0), 10, None),  # min_free_disk 0 disables the disk check
    ],
)
def test_on_mail(state: Pressure, declared: int, reply: Reply | None) -> None:
    assert on_mail(state, declared) == reply


def test_storage_low_is_the_rfc_1870_temporary_refusal() -> None:
    assert replies.STORAGE_LOW.line == "452 4.3.1 Insufficient system storage, try again later"
    assert replies.STORAGE_LOW.transient


@pytest.mark.parametrize(
    ("options", "size"),
    [
        ([], 0),
        (["BODY=8BITMIME"], 0),
        (["SIZE=2048"], 2048),
        (["BODY=8BITMIME", "SIZE=12", "SMTPUTF8"], 12),
        (["size=7"], 7),
        (["SIZE"], 0),
        (["SIZE=x"], 0),
    ],
)
def test_declared_size(options: list[str], size: int) -> None:
    assert declared_size(options) == size


@pytest.mark.parametrize(
    ("above", "usage", "delay"),
    [
        (80.0, 0.0, 0.0),
        (80.0, 80.0, 0.0),
        (80.0, 80.1, 1.5),
        (80.0, 250.0, 1.5),
        (0.0, 99.0, 0.0),  # 0 disables the tarpit
    ],
)
def test_tarpit_delay(above: float, usage: float, delay: float) -> None:
    limits = Limits(3, nets("127.0.0.0/8"), tarpit_above_percent=above, tarpit_delay_s=1.5)
    assert tarpit_delay(limits, usage) == delay


def test_client_ip_from_a_peer_tuple_or_a_session() -> None:
    from types import SimpleNamespace

    from smtpbalancer.frontend.admission import client_ip, session_ip

    assert client_ip(("203.0.113.7", 5555)) == "203.0.113.7"
    assert client_ip(("::1", 25, 0, 0)) == "::1"
    assert client_ip(None) == "unknown"
    assert session_ip(SimpleNamespace(peer=("127.0.0.2", 4000))) == "127.0.0.2"
    assert session_ip(None) == "unknown"
