"""Specification of `with_enhanced_status`: RFC 3463 codes on the replies aiosmtpd originates."""

from __future__ import annotations

import pytest

from smtpbalancer.frontend.server import with_enhanced_status


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
        ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
        ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
        ("502 Command not implemented", "502 5.5.1 Command not implemented"),
        ("421 Too busy", "421 4.3.2 Too busy"),
        ("451 Try later", "451 4.3.0 Try later"),
        ("553 Bad address", "553 5.1.3 Bad address"),
        ("252 Cannot VRFY", "252 2.0.0 Cannot VRFY"),
        ("250", "250 2.0.0"),
        # Codes without a table entry get the generic status of their class.
        ("299 Odd", "299 2.0.0 Odd"),
        ("459 Odd", "459 4.0.0 Odd"),
        ("599 Odd", "599 5.0.0 Odd"),
    ],
)
def test_bare_codes_get_a_status(line: str, expected: str) -> None:
    assert with_enhanced_status(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "250 2.1.0 Sender OK",
        "250 2.0.0 Ok: queued as 0197A1B2C3D4E5F60718",
        "554 5.7.1 Relay access denied",
        "452 4.5.3 Too many recipients",
        "250 2.0.0",
    ],
)
def test_lines_that_carry_a_status_are_unchanged(line: str) -> None:
    assert with_enhanced_status(line) == line


@pytest.mark.parametrize(
    "line",
    ["552 Error: message size exceeds fixed maximum message size", "552 Error: Too much mail data"],
)
def test_aiosmtpd_size_refusals_become_our_too_big_reply(line: str) -> None:
    assert with_enhanced_status(line) == "552 5.3.4 Message size exceeds fixed maximum message size"


@pytest.mark.parametrize(
    "line",
    ["354 End data with <CR><LF>.<CR><LF>", "334 VXNlcm5hbWU6", "", "OK", "25"],
)
def test_lines_without_a_245_code_are_unchanged(line: str) -> None:
    assert with_enhanced_status(line) == line


def test_the_answer_is_the_same_on_a_cache_hit() -> None:
    first = with_enhanced_status("250 Cached OK")
    assert with_enhanced_status("250 Cached OK") == first == "250 2.0.0 Cached OK"
