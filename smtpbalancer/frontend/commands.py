"""The common MAIL and RCPT arguments, parsed without aiosmtpd's general parser.

Pure: no I/O, no asyncio, no logging. Each function returns the parsed
arguments only for a line that aiosmtpd's smtp_MAIL/smtp_RCPT would accept
with exactly that result, and None for anything else: the caller then hands
the line to aiosmtpd, which produces its usual reply (syntax errors, 552 for
an oversized SIZE=, 555 for unknown parameters, …). So this module may only
ever say less than aiosmtpd, never something different.

The common case is `FROM:<dot-atom@host.name>` (optionally with SIZE=, BODY=
and SMTPUTF8) and `TO:<dot-atom@host.name>` without parameters; aiosmtpd's
email header parser costs about a fifth of the proxy's CPU per message.
"""

from __future__ import annotations

import re
from typing import Final

_ATEXT: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# <dot-atom@host.name> and whatever follows (the parameters).
SIMPLE_ADDRESS: Final = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*(.*)\Z", re.S
)
_BODY_TYPES: Final = frozenset({"7BIT", "8BITMIME"})


def simple_mail(
    arg: str | None, *, extended: bool, size_limit: int | None, smtputf8_enabled: bool
) -> tuple[str, list[str], bool] | None:
    """(address, upper-cased options, SMTPUTF8 requested) for a plain MAIL argument.

    The caller has checked the session state aiosmtpd checks first (HELO seen, AUTH
    not required, no open transaction) and that aiosmtpd validates BODY= (decode_data
    off). `arg` is the stripped text after "MAIL".
    """
    if arg is None or arg[:5].upper() != "FROM:":
        return None
    found = SIMPLE_ADDRESS.match(arg[5:].strip())
    if found is None:
        return None
    address, params = found.group(1), found.group(2)
    if not params:
        return address, [], False
    if not extended:
        return None  # aiosmtpd: 501, parameters need EHLO
    options = params.upper().split()
    smtputf8 = False
    seen: set[str] = set()
    for option in options:
        name, _, value = option.partition("=")
        if name in seen:
            return None  # aiosmtpd keeps the last one; leave such lines to it
        seen.add(name)
        if name == "BODY" and value in _BODY_TYPES:
            continue
        if name == "SIZE" and value.isascii() and value.isdigit():
            if size_limit and int(value) > size_limit:
                return None  # aiosmtpd: 552
            continue
        if option == "SMTPUTF8" and smtputf8_enabled:
            smtputf8 = True
            continue
        return None
    return address, options, smtputf8


def simple_rcpt(arg: str | None) -> str | None:
    """The address of a plain RCPT argument without parameters (the caller has checked
    that HELO was seen, AUTH is not required and MAIL was given)."""
    if arg is None or arg[:3].upper() != "TO:":
        return None
    found = SIMPLE_ADDRESS.match(arg[3:].strip())
    if found is None or found.group(2):
        return None
    return found.group(1)
