"""Who may relay, and what fits: pure decisions for the front end.

No I/O, no clock, no logging: each function returns None to admit or the
Reply to send. Invariants: never an open relay — a client outside
`allow_networks` that has not authenticated gets 530 5.7.0 at MAIL (when AUTH
is offered) or 554 5.7.1 at RCPT, and nothing is spooled; a full spool
or disk is a 452 4.3.1 at MAIL (invariant 5: backpressure is never a 5xx).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from smtpbalancer import replies
from smtpbalancer.config import Network
from smtpbalancer.frontend import hardening
from smtpbalancer.replies import Reply

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Limits:
    max_recipients: int
    allow_networks: tuple[Network, ...]
    tarpit_above_percent: float = 0.0  # of the spool's max size; 0 disables the tarpit
    tarpit_delay_s: float = 0.0
    auth_offered: bool = False  # a users file is configured: outsiders may AUTH to relay


@dataclass(frozen=True, slots=True)
class Pressure:
    """A snapshot of the spool's room, in bytes."""

    spool_bytes: int  # stored messages
    reserved_bytes: int  # declared by open transactions, not stored yet
    max_spool_bytes: int
    free_disk_bytes: int  # on the spool's file system, for unprivileged users
    min_free_disk_bytes: int  # the floor below which nothing is admitted


class Room(Protocol):
    """What on_mail reads: a Pressure snapshot, or the spool's live counters themselves
    (read once each, so the hot path builds no snapshot per MAIL)."""

    @property
    def spool_bytes(self) -> int: ...

    @property
    def reserved_bytes(self) -> int: ...

    @property
    def max_spool_bytes(self) -> int: ...

    @property
    def free_disk_bytes(self) -> int: ...

    @property
    def min_free_disk_bytes(self) -> int: ...


def client_ip(peer: object) -> str:
    """The client's address from a socket peer tuple (or a PROXY-protocol one), or "unknown".

    The one place the front end turns a peer into the address that relay policy,
    per-client limits, AUTH throttling and logs all use, so they can never disagree.
    """
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"


def session_ip(session: object) -> str:
    """client_ip of an aiosmtpd Session (its `peer` is the PROXY'd client when there is one)."""
    return client_ip(getattr(session, "peer", None))


def may_relay(client_ip: str, networks: Sequence[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def on_mail_relay(
    limits: Limits, client_ip: str, authenticated: bool, *, allowed: bool | None = None
) -> Reply | None:
    """Relay policy at MAIL: inside allow_networks, or authenticated, or 530 5.7.0.

    Without a users file there is no AUTH to ask for, so the refusal stays 554 5.7.1 at RCPT.
    `allowed` is may_relay(client_ip, limits.allow_networks) when the caller has it already.
    """
    if authenticated or not limits.auth_offered:
        return None
    if allowed is None:
        allowed = may_relay(client_ip, limits.allow_networks)
    return None if allowed else replies.AUTH_REQUIRED  # RFC 4954 §6


def on_rcpt(
    limits: Limits,
    client_ip: str,
    recipients_so_far: int,
    authenticated: bool = False,
    *,
    allowed: bool | None = None,
) -> Reply | None:
    """Relay policy and the recipient limit at RCPT; `allowed` as for on_mail_relay."""
    if not authenticated:
        if allowed is None:
            allowed = may_relay(client_ip, limits.allow_networks)
        if not allowed:
            return replies.RELAY_DENIED
    if recipients_so_far >= limits.max_recipients:
        return replies.TOO_MANY_RECIPIENTS  # RFC 5321 §4.5.3.1.10: 452, the client sends the rest
    return None


def declared_size(mail_options: Sequence[str]) -> int:
    """The RFC 1870 SIZE= a client declared at MAIL, or 0 (aiosmtpd checked the syntax)."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


def on_mail(pressure: Room, declared: int) -> Reply | None:
    """Refuse a transaction the spool has no room for (Postfix queue_minfree, RFC 1870 §6.1)."""
    if pressure.free_disk_bytes < pressure.min_free_disk_bytes:
        return replies.STORAGE_LOW
    if pressure.spool_bytes + pressure.reserved_bytes + declared > pressure.max_spool_bytes:
        return replies.STORAGE_LOW
    return None


def tarpit_delay(limits: Limits, usage_percent: float) -> float:
    """Seconds to hold the final 250 at DATA: slows arrivals while the spool fills."""
    if 0 < limits.tarpit_above_percent < usage_percent:
        return limits.tarpit_delay_s
    return 0.0


def has_control_chars(text: str) -> bool:
    """True for CR, LF, NUL or any other C0 control: never relayed (invariant 7)."""
    return _CONTROL.search(text) is not None


def trace_protocol(*, extended: bool, smtputf8: bool, tls: bool, authenticated: bool) -> str:
    """The Received: `with` keyword: RFC 3848 (ESMTPS, ESMTPA, ESMTPSA), RFC 6531 (UTF8SMTP…)."""
    if not extended and not smtputf8:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def trace_name(helo: str | None) -> str:
    """The EHLO name as it may appear in our Received: header (invariant 7).

    A Domain or address-literal is kept; anything else (control characters,
    spaces, non-ASCII, bad labels or literals) becomes "unknown". HELO is not
    policed: the session goes on, only the header is sanitised.
    """
    if not helo or not hardening.valid_helo(helo):
        return "unknown"
    return helo
