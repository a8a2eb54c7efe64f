"""The handler's per-client relay memo follows a reload, and its date memo the clock."""

from __future__ import annotations

import email.utils
import ipaddress
from typing import Any

from smtpbalancer.frontend.admission import Limits
from smtpbalancer.frontend.handler import Handler
from smtpbalancer.frontend.server import with_enhanced_status


def _handler(limits: Limits) -> Handler:
    stub: Any = object()
    return Handler(hostname="mx.test", limits=limits, submitter=stub, pressure=stub, clock=stub)


def test_relay_memo_is_emptied_by_a_reload() -> None:
    loopback = Limits(max_recipients=10, allow_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    handler = _handler(loopback)
    assert handler._may_relay("127.0.0.1") is True
    assert handler._may_relay("192.0.2.1") is False
    handler.reconfigure(hostname="mx.test", limits=Limits(max_recipients=10, allow_networks=()))
    assert handler._may_relay("127.0.0.1") is False


def test_date_memo_matches_formatdate_each_second() -> None:
    handler = _handler(Limits(max_recipients=1, allow_networks=()))
    for wall in (1_750_000_000.0, 1_750_000_000.7, 1_750_000_001.2, 1_750_000_059.9):
        assert handler._date_header(wall) == email.utils.formatdate(int(wall), usegmt=True)


def test_lines_with_a_status_are_passed_through_uncached() -> None:
    line = "250 2.0.0 Ok: queued as 0123456789AB"
    assert with_enhanced_status(line) == line
    assert with_enhanced_status("250 OK") == "250 2.0.0 OK"
    assert with_enhanced_status("503 Error: need RCPT command") == (
        "503 5.5.1 Error: need RCPT command"
    )
