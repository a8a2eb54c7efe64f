"""Who may relay, and what fits: pure decisions for the front end.

No I/O, no clock, no logging: each function returns None to admit or the
Reply to send. Invariant: never an open relay — a client outside
`allow_networks` gets 554 5.7.1 at RCPT and nothing is spooled.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from smtpbalancer import replies
from smtpbalancer.config import Network
from smtpbalancer.replies import Reply

_SAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Limits:
    max_recipients: int
    allow_networks: tuple[Network, ...]


def may_relay(client_ip: str, networks: Sequence[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def on_rcpt(limits: Limits, client_ip: str, recipients_so_far: int) -> Reply | None:
    if not may_relay(client_ip, limits.allow_networks):
        return replies.RELAY_DENIED
    if recipients_so_far >= limits.max_recipients:
        return replies.TOO_MANY_RECIPIENTS  # RFC 5321 §4.5.3.1.10: 452, the client sends the rest
    return None


def has_control_chars(text: str) -> bool:
    """True for CR, LF, NUL or any other C0 control: never relayed (invariant 7)."""
    return _CONTROL.search(text) is not None


def trace_name(helo: str | None) -> str:
    """The EHLO name as it may appear in our Received: header (invariant 7)."""
    if not helo:
        return "unknown"
    return _SAFE_HELO.sub("?", helo)[:255]
