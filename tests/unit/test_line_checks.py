"""The pure line and body checks of frontend/hardening.py."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpbalancer import config, replies
from smtpbalancer.errors import ConfigError
from smtpbalancer.frontend import hardening
from smtpbalancer.frontend.hardening import clean_body, command_refusal


@pytest.mark.parametrize(
    ("line", "extended", "reply"),
    [
        (b"NOOP\r\n", False, None),
        (b"NOOP\n", False, replies.BARE_NEWLINE),
        (b"NO\rOP\r\n", False, replies.BARE_NEWLINE),
        (b"NOOP\x00\r\n", False, replies.BARE_NEWLINE),
        (b"NOOP " + b"x" * 505 + b"\r\n", False, None),  # 512 with CRLF
        (b"NOOP " + b"x" * 506 + b"\r\n", False, replies.COMMAND_TOO_LONG),
        (b"MAIL " + b"x" * 530 + b"\r\n", True, None),  # SIZE and SMTPUTF8 room
        (b"MAIL " + b"x" * 530 + b"\r\n", False, replies.COMMAND_TOO_LONG),
    ],
)
def test_command_refusal(line: bytes, extended: bool, reply: replies.Reply | None) -> None:
    assert command_refusal(line, extended=extended) == reply


@pytest.mark.parametrize(
    ("body", "cleaned"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\r\r\n", b"a\r\n\r\n"),
        (b"x\n.\r\nMAIL FROM:<e@x>\r\n", b"x\r\n.\r\nMAIL FROM:<e@x>\r\n"),
    ],
)
def test_clean_body_normalises_bare_newlines(body: bytes, cleaned: bytes) -> None:
    assert clean_body(body) == (cleaned, None)


def test_clean_body_refuses_nul_and_keeps_clean_bodies_as_is() -> None:
    assert clean_body(b"a\x00\r\n")[1] is replies.NUL_IN_DATA
    body = b"clean\r\n"
    assert clean_body(body)[0] is body


UPSTREAM = [{"name": "a", "address": "127.0.0.1:25"}]


def test_proxy_protocol_needs_trusted_proxies() -> None:
    with pytest.raises(ConfigError, match=r"server\.trusted_proxies: required"):
        config.from_mapping({"server": {"proxy_protocol": True}, "upstream": UPSTREAM})
    server = {"proxy_protocol": True, "trusted_proxies": ["10.0.0.0/8"], "data_timeout": "1m"}
    cfg = config.from_mapping({"server": server, "upstream": UPSTREAM})
    assert cfg.server.trusted_proxies[0].prefixlen == 8 and cfg.server.data_timeout_s == 60.0


def test_auth_lines_may_be_longer_than_other_commands() -> None:
    """RFC 4954 §4: an AUTH initial response can exceed the 512-octet command limit."""
    line = b"AUTH PLAIN " + b"A" * 600 + b"\r\n"
    assert command_refusal(line, extended=True) is None
    assert command_refusal(b"NOOP " + b"A" * 600 + b"\r\n", extended=True) is not None


def test_a_text_line_may_carry_998_octets_after_its_doubled_dot_is_gone() -> None:
    fits = b"Subject: s\r\n\r\n." + b"z" * 997 + b"\r\n"
    assert clean_body(fits) == (fits, None)
    too_long = b"Subject: s\r\n\r\n" + b"x" * 999 + b"\r\nend\r\n"
    assert clean_body(too_long)[1] is replies.TEXT_LINE_TOO_LONG
    first_line = b"y" * 999 + b"\r\n\r\nbody\r\n"
    assert clean_body(first_line)[1] is replies.TEXT_LINE_TOO_LONG


@given(
    st.lists(
        st.tuples(st.integers(0, 1100), st.sampled_from([b"\r\n", b"\n", b"\r", b""])),
        max_size=12,
    )
)
def test_the_block_scan_for_long_lines_agrees_with_measuring_every_line(
    parts: list[tuple[int, bytes]],
) -> None:
    content = b"".join(b"x" * n + end for n, end in parts)
    longest = max((len(line) for line in re.split(rb"\r\n|\r|\n", content)), default=0)
    assert hardening._has_overlong_line(content) == (longest > 998)
