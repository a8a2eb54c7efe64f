"""SMTP replies: the ones we send, and what upstreams answer us.

Every reply the proxy originates is a constant here, with an RFC 3463 enhanced
status code and a bland, peer-safe text. `SendResult` is the vocabulary the
upstream connection reports in, so that delivery policy stays free of aiosmtplib.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Final, NamedTuple

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


class _ReplyFields(NamedTuple):
    code: int
    status: str  # RFC 3463 enhanced status, e.g. "4.3.1"; "" when the peer gave none
    text: str
    line: str  # the wire form, computed once


class Reply(_ReplyFields):
    """One SMTP reply: Reply(code, status, text); `line` is derived.

    An immutable tuple rather than a frozen dataclass: the relay builds one per
    message (the upstream's final reply), and a tuple is several times cheaper to
    build than a frozen dataclass's attribute-by-attribute __init__.
    """

    __slots__ = ()

    def __new__(cls, code: int, status: str, text: str) -> Reply:
        if status:
            line = f"{code} {status} {text}" if text else f"{code} {status}"
        else:
            line = f"{code} {text}" if text else str(code)
        return tuple.__new__(cls, (code, status, text, line))

    def __getnewargs__(self) -> tuple[int, str, str]:  # copy and pickle call __new__ with these
        return self.code, self.status, self.text

    def __repr__(self) -> str:
        return f"Reply(code={self.code!r}, status={self.status!r}, text={self.text!r})"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def effective_status(self) -> str:
        """The enhanced status, or the RFC 3463 generic one for the code's class."""
        if self.status:
            return self.status
        return f"{str(self.code)[0]}.0.0"

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """Build a Reply from an upstream's code and (possibly multi-line) text."""
        text = " ".join(message.split())  # folds CR/LF and continuation lines
        found = _STATUS.match(text)
        if found:
            return cls(code, found.group(0), text[found.end() :].strip())
        return cls(code, "", text)


class Signal(enum.StrEnum):
    """What an attempt says about the upstream (see delivery/outcome.py)."""

    SUCCESS = "success"
    FAILURE = "failure"
    THROTTLED = "throttled"
    NEUTRAL = "neutral"


class SendResult(NamedTuple):  # a tuple: one per transaction, the cheapest value to build
    """The outcome of one upstream transaction that the upstream answered.

    refused: per-recipient RCPT refusals; a recipient absent here was accepted at RCPT.
    final: the MAIL refusal if MAIL failed, else the DATA reply (or the RCPT-stage
           summary when every recipient was refused and DATA was never sent).
    queue_id: the upstream's own queue id, when its 250 said "queued as X".
    """

    refused: Mapping[str, Reply]
    final: Reply
    queue_id: str = ""
    stage: str = "data"  # the step that produced `final`: "mail", "rcpt" or "data"


# --- replies the proxy sends -------------------------------------------------
OK: Final = Reply(250, "2.0.0", "OK")
OK_SENDER: Final = Reply(250, "2.1.0", "Sender OK")
OK_RECIPIENT: Final = Reply(250, "2.1.5", "Recipient OK")
BYE: Final = Reply(221, "2.0.0", "Bye")
SHUTTING_DOWN: Final = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_CONNECTIONS: Final = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_HOST: Final = Reply(
    421, "4.7.0", "Too many connections from your host, try again later"
)
SPOOL_WRITE_FAILED: Final = Reply(451, "4.3.0", "Queue write error, try again later")
TOO_MANY_RECIPIENTS: Final = Reply(452, "4.5.3", "Too many recipients")
STORAGE_LOW: Final = Reply(452, "4.3.1", "Insufficient system storage, try again later")
RELAY_DENIED: Final = Reply(554, "5.7.1", "Relay access denied")
TOO_BIG: Final = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BAD_ADDRESS: Final = Reply(501, "5.1.7", "Bad address syntax")
BAD_SYNTAX: Final = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
# Line discipline (frontend/hardening.py, frontend/guard.py)
BARE_NEWLINE: Final = Reply(501, "5.5.2", "Syntax error: bare CR, bare LF or NUL in command")
COMMAND_TOO_LONG: Final = Reply(500, "5.5.2", "Command line too long")
TEXT_LINE_TOO_LONG: Final = Reply(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.6)")
NUL_IN_DATA: Final = Reply(550, "5.6.0", "Message contains NUL characters")
TOO_MANY_BAD_COMMANDS: Final = Reply(421, "4.7.0", "Too many bad commands, closing connection")
TIMEOUT: Final = Reply(421, "4.4.2", "Error: timeout exceeded, closing connection")
TALKED_TOO_SOON: Final = Reply(554, "5.5.0", "Protocol error: talking before the greeting")
UNTRUSTED_PROXY: Final = Reply(421, "4.7.0", "Connection not accepted, closing connection")
# TLS and AUTH (RFC 3207, RFC 4954)
TLS_ALREADY_ACTIVE: Final = Reply(503, "5.5.1", "TLS already active")
AUTH_REQUIRED: Final = Reply(530, "5.7.0", "Authentication required")
AUTH_OK: Final = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID: Final = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TOO_MANY_FAILURES: Final = Reply(421, "4.7.0", "Too many failed authentication attempts")
AUTH_ABORTED: Final = Reply(501, "5.7.0", "Authentication aborted")
AUTH_BAD_BASE64: Final = Reply(501, "5.5.2", "Cannot decode base64")


def queued(queue_id: str) -> str:
    """The DATA reply: the queue id is the last token (Postfix shape, parsed by ESPs)."""
    return f"250 2.0.0 Ok: queued as {queue_id}"


def duplicate(queue_id: str) -> str:
    """DATA reply for a resend suppressed by [dedupe]: the first copy's queue id, last."""
    return f"250 2.0.0 Ok: duplicate, not queued again; queued as {queue_id}"


_QUEUED_AS = re.compile(r"queued as ([A-Za-z0-9._@<>-]+)", re.IGNORECASE)


def upstream_queue_id(text: str) -> str:
    """The upstream's queue id from a 250 reply ("... queued as 8BDCA22DA71"), or ""."""
    found = _QUEUED_AS.search(text)
    return found.group(1) if found else ""
