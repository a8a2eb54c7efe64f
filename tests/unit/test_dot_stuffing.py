"""The body as the relay client sends it after DATA's 354 (RFC 5321 §4.5.2): CRLF line
ends whatever it was given (invariant 7: never a bare CR or LF upstream, even if a body
reached the spool without the front end's normalisation), dots doubled at line
starts, a CRLF before the final dot."""

from __future__ import annotations

import random

import pytest

from smtpbalancer.upstream.connection import _dot_stuffed


@pytest.mark.parametrize(
    ("body", "sent"),
    [
        (b"", b".\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
        (b".a\r\n.\r\n..b\r\n", b"..a\r\n..\r\n...b\r\n.\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n.\r\n"),  # bare LFs
        (b"a\rb\r", b"a\r\nb\r\n.\r\n"),  # bare CRs
        (b"a\r\r\nb\n\rc", b"a\r\n\r\nb\r\n\r\nc\r\n.\r\n"),
        (b"x\n.y\r.z", b"x\r\n..y\r\n..z\r\n.\r\n"),  # a dot after a bare line end
        (b"\n", b"\r\n.\r\n"),
    ],
)
def test_line_ends_and_dots(body: bytes, sent: bytes) -> None:
    assert _dot_stuffed(body) == sent


def test_no_bare_cr_or_lf_ever_leaves() -> None:
    rng = random.Random(5321)
    for _ in range(2000):
        body = bytes(rng.choice(b"ab.\r\n") for _ in range(rng.randint(0, 30)))
        sent = _dot_stuffed(body)
        without_pairs = sent.replace(b"\r\n", b"")
        assert b"\r" not in without_pairs and b"\n" not in without_pairs, body
        assert sent.endswith(b"\r\n.\r\n") or sent == b".\r\n"  # an empty body
        lines = sent[:-3].split(b"\r\n")
        assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines), body
