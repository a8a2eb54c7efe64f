"""The front end's fast address parser agrees with aiosmtpd's own on every input."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtpd.smtp import SMTP

from smtpbalancer.frontend.server import _Session

CASES = [
    "<alice@example.com>",
    "<alice@example.com> SIZE=1000 BODY=8BITMIME",
    "<a.b+tag@sub.example.co.uk>",
    "<a..b@example.com>",
    "<.a@example.com>",
    "<a.@example.com>",
    '<"quoted local"@example.com>',
    "<a@[192.0.2.1]>",
    "<>",
    "<a@b>",
    "<a@-b.example>",
    "alice@example.com",
    "<alice@example.com",
    "<alice@exa mple.com>",
    "<a@b.c>x",
    "",
]


@pytest.mark.parametrize("arg", CASES)
def test_fast_path_matches_aiosmtpd(arg: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        reference = SMTP(handler=object(), loop=loop)
        ours = _Session(handler=object(), frontend=None, loop=loop)  # type: ignore[arg-type]
        assert ours._getaddr(arg) == reference._getaddr(arg)
    finally:
        loop.close()
