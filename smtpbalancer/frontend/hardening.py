"""What may cross the front end: pure checks on command lines, bodies and EHLO names.

A proxy re-emits what it received to an upstream that trusts it, so every
ambiguity it passes on becomes the upstream's problem (SMTP smuggling,
CVE-2023-51764/51765/51766). Invariant 7: nothing user-controlled reaches the
upstream with a bare CR or LF. These functions decide; `guard.py` and
`handler.py` act. No I/O, no asyncio, no clock, no logging.

Command lines (RFC 5321 §2.3.8, §4.5.3.1.4):
- a line that ends in a bare LF, or holds a bare CR or a NUL, is refused with
  501 5.5.2 and never parsed (aiosmtpd itself splits commands at LF alone);
- 512 octets including CRLF (MAIL under ESMTP: +26 for SIZE, RFC 1870, and +10
  for SMTPUTF8, RFC 6531), else 500 5.5.2.

DATA (the policy, chosen once): a bare CR or bare LF in the body is normalised
to CRLF when the message is received, before it is spooled, so the spool holds
exactly the bytes that are relayed and an end-of-data look-alike such as
`\\n.\\r\\n` becomes an ordinary dot line that the relay dot-stuffs. Only
`<CRLF>.<CRLF>` ends DATA. A NUL anywhere in the body is refused with
550 5.6.0 (RFC 5322 §2.3 forbids it; many MTAs truncate at it). Refusing bare
newlines instead (Postfix `smtpd_forbid_bare_newline`) would reject mail from
PHP mailers that still emit bare LF; normalising accepts it without letting
the ambiguity through.

Text lines: 1000 octets including CRLF (RFC 5321 §4.5.3.1.6), counted on the
wire between CRLFs by aiosmtpd's DATA reader; longer gets 500 5.5.2.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from smtpbalancer import replies
from smtpbalancer.replies import Reply

MAX_COMMAND_LINE: Final = 512  # octets including CRLF, RFC 5321 §4.5.3.1.4
MAX_MAIL_LINE: Final = MAX_COMMAND_LINE + 26 + 10  # RFC 1870 SIZE, RFC 6531 SMTPUTF8
MAX_TEXT_LINE: Final = 1000  # octets including CRLF, RFC 5321 §4.5.3.1.6

_LINE_END: Final = re.compile(rb"\r\n|\r|\n")
_BLOCK: Final = MAX_TEXT_LINE // 2  # a run of MAX_TEXT_LINE - 1 octets covers a whole block
_IP_CHARS: Final = frozenset("0123456789abcdefABCDEF.:")
_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


def command_refusal(line: bytes, *, extended: bool) -> Reply | None:
    """None if `line` (read up to LF, included) is a well-formed command line."""
    if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\x00" in line:
        return replies.BARE_NEWLINE
    limit = MAX_COMMAND_LINE
    verb = line[:5].upper()
    if extended and verb == b"MAIL ":
        limit = MAX_MAIL_LINE
    elif verb == b"AUTH ":
        # RFC 4954 §4 allows AUTH lines up to 12288 octets; ours stop at the reader's
        # line limit, which still fits any PLAIN/LOGIN initial response.
        limit = MAX_TEXT_LINE
    if len(line) > limit:
        return replies.COMMAND_TOO_LONG
    return None


def clean_body(content: bytes) -> tuple[bytes, Reply | None]:
    """The body as it will be spooled and relayed, or the refusal for it.

    Three C-level counts decide whether anything needs rewriting; the common,
    clean body is returned as the same object, untouched.
    """
    if b"\x00" in content:
        return content, replies.NUL_IN_DATA
    # The reader lets a wire line be one octet longer than MAX_TEXT_LINE, for the dot a
    # client doubles at the start of a line (RFC 5321 §4.5.3.1.6 does not count it);
    # here, after the doubled dots are gone, every line must fit MAX_TEXT_LINE.
    if len(content) >= MAX_TEXT_LINE and _has_overlong_line(content):
        return content, replies.TEXT_LINE_TOO_LONG
    crlf = content.count(b"\r\n")
    if content.count(b"\r") == crlf and content.count(b"\n") == crlf:
        return content, None
    return _LINE_END.sub(b"\r\n", content), None


def _has_overlong_line(content: bytes) -> bool:
    """Is there a line with more than MAX_TEXT_LINE - 2 octets before its line end?

    Such a run of MAX_TEXT_LINE - 1 octets without CR or LF contains a whole aligned block
    of _BLOCK octets, so a body whose every block holds a line end (all ordinary mail) is
    cleared with a C-level find per block; only a suspect body is split and measured.
    """
    for start in range(0, len(content) - _BLOCK + 1, _BLOCK):
        end = start + _BLOCK
        if content.find(b"\n", start, end) < 0 and content.find(b"\r", start, end) < 0:
            return max(map(len, _LINE_END.split(content))) > MAX_TEXT_LINE - 2
    return False


def valid_helo(name: str) -> bool:
    """RFC 5321 §4.1.1.1 Domain or address-literal (underscores tolerated in labels)."""
    if name.startswith("[") and name.endswith("]"):
        literal = name[1:-1]
        if literal[:5].upper() == "IPV6:":
            return _is_ip(literal[5:], version=6)
        return _is_ip(literal, version=4)
    host = name[:-1] if name.endswith(".") else name
    if not host or len(host) > 253 or not host.isascii():
        return False
    return all(_LABEL.match(label) for label in host.split("."))


def _is_ip(text: str, *, version: int) -> bool:
    if not text or not all(c in _IP_CHARS for c in text):  # no "%scope" (it may hold CR/LF)
        return False
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False
