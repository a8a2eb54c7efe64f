"""RFC 3464 delivery status notifications (bounces) for recipients we gave up on.

Pure: no asyncio, no clock reads, no logging, no I/O. Callers pass wall-clock times.

Invariants of `build_dsn` output:
- a complete RFC 5322 message, `multipart/report; report-type=delivery-status` (RFC 6522) with
  three parts: human text, `message/delivery-status`, `text/rfc822-headers`;
- CRLF line endings only; a CR or LF inside any caller-supplied single-line value becomes a
  space, so no input can end a header line early or inject a field;
- deterministic: the same arguments give the same bytes (the boundary derives from queue_id);
- the delivery-status part is 7-bit ASCII; non-ASCII addresses use RFC 6533 utf-8-addr-xtext;
- never addressed to the null sender (RFC 5321 §4.5.5, §6.1): that raises ValueError.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate

_BLANK_LINE = re.compile(rb"(?:^|\n)(\r?\n)")
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_CR_LF = re.compile(r"[\r\n]+")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_NOT_BCHARS = re.compile(r"[^0-9A-Za-z'()+_,\-./:=?]")  # RFC 2046 §5.1.1, minus space


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str  # the original recipient address (may be non-ASCII UTF-8)
    status: str  # RFC 3463 code, e.g. "5.1.1", or "4.4.7" for lifetime expiry
    diagnostic: str  # the upstream reply line, e.g. "550 5.1.1 User unknown"; "" if none
    remote_mta: str = ""  # upstream host that gave the reply, "" if none
    last_attempt_wall: float | None = None  # unix seconds


def original_headers(message: bytes, limit: int = 64 * 1024) -> bytes:
    """The header block of an RFC 5322 message (up to and excluding the blank line).

    At most `limit` bytes, cut after the last complete line that fits. A message without a
    blank line is all header.
    """
    window = message[: limit + 4]  # enough to see a blank line that starts within the limit
    found = _BLANK_LINE.search(window)
    head = window[: found.start(1)] if found else window
    if len(head) > limit:
        head = head[: head.rfind(b"\n", 0, limit) + 1]
    return head


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    original_sender: str,
    arrival_wall: float,
    now_wall: float,
    failed: Sequence[FailedRecipient],
    original_headers: bytes,
    message_id: str,
) -> bytes:
    """A bounce for `failed`, to be sent with `MAIL FROM:<>` to `original_sender`.

    Raises ValueError when there is nothing to report, when the sender is the null sender,
    or when a recipient's status is not an RFC 3463 code.
    """
    sender = _one_line(original_sender).strip()
    if sender in ("", "<>"):
        raise ValueError("dsn: never bounce to the null sender")
    if not failed:
        raise ValueError("dsn: no failed recipients")
    for r in failed:
        if not _STATUS.fullmatch(r.status):
            raise ValueError(f"dsn: bad status {r.status!r} for {r.address!r}")
    mta = _one_line(reporting_mta)
    parts = [
        _part("text/plain; charset=utf-8", _explanation(mta, failed)),
        _part("message/delivery-status", _delivery_status(mta, queue_id, arrival_wall, failed)),
        _part("text/rfc822-headers", _crlf(original_headers)),
    ]
    boundary = _NOT_BCHARS.sub("", f"{queue_id}.dsn/{mta}")[:60]
    while any(b"--" + boundary.encode() in part for part in parts):
        boundary += "="  # RFC 2046 §5.1.1: the boundary must not occur in any part
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {formatdate(now_wall, usegmt=True)}",
        f"Message-ID: <{_one_line(message_id).strip('<> ')}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5: no auto-replies to this
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    delimiter = f"--{boundary}\r\n".encode()
    body = b"".join(delimiter + part + b"\r\n" for part in parts)
    return _lines(head) + body + f"--{boundary}--\r\n".encode()


def _explanation(mta: str, failed: Sequence[FailedRecipient]) -> bytes:
    lines = [
        f"This is the mail system at host {mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It has been returned with this notice; its headers are attached below.",
        "",
    ]
    lines += [f"<{_one_line(r.address)}>: {_reason(r)}" for r in failed]
    return _lines(lines)


def _reason(r: FailedRecipient) -> str:
    diagnostic = _one_line(r.diagnostic).strip()
    if diagnostic and r.remote_mta:
        diagnostic = f"host {_one_line(r.remote_mta)} said: {diagnostic}"
    if r.status != "4.4.7":  # RFC 3463: 4.4.7 is "delivery time expired"
        return diagnostic or f"delivery failed (status {r.status})"
    return "delivery time expired" + (f"; last reply: {diagnostic}" if diagnostic else "")


def _delivery_status(
    mta: str, queue_id: str, arrival_wall: float, failed: Sequence[FailedRecipient]
) -> bytes:
    fields = [  # RFC 3464 §2.2 per-message fields
        f"Reporting-MTA: dns; {mta}",
        f"X-Smtpbalancer-Queue-ID: {_one_line(queue_id)}",
        f"Arrival-Date: {formatdate(arrival_wall, usegmt=True)}",
    ]
    for r in failed:  # RFC 3464 §2.3 per-recipient fields, each group after a blank line
        fields += ["", f"Final-Recipient: {_address_field(r.address)}"]
        fields += ["Action: failed", f"Status: {r.status}"]
        if r.remote_mta:
            fields.append(f"Remote-MTA: dns; {_one_line(r.remote_mta)}")
        if diagnostic := _one_line(r.diagnostic).strip():
            fields.append(f"Diagnostic-Code: smtp; {diagnostic}")
        if r.last_attempt_wall is not None:
            fields.append(f"Last-Attempt-Date: {formatdate(r.last_attempt_wall, usegmt=True)}")
    return _lines(fields, "ascii")  # message/delivery-status is 7-bit


def _address_field(address: str) -> str:
    address = _one_line(address)
    if address.isascii():
        return f"rfc822; {address}"
    # RFC 6533 §3 utf-8-addr-xtext: anything outside QCHAR becomes \x{HEX}
    return "utf-8; " + "".join(c if _qchar(c) else f"\\x{{{ord(c):02X}}}" for c in address)


def _qchar(c: str) -> bool:
    return "\x21" <= c <= "\x7e" and c not in "+=\\"


def _part(content_type: str, content: bytes) -> bytes:
    head = [f"Content-Type: {content_type}"]
    if not content.isascii():
        head.append("Content-Transfer-Encoding: 8bit")
    return _lines([*head, ""]) + content


def _one_line(text: str) -> str:
    return _CR_LF.sub(" ", text)


def _lines(lines: Sequence[str], encoding: str = "utf-8") -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode(encoding, "replace")


def _crlf(block: bytes) -> bytes:
    block = _LINE_ENDS.sub(b"\r\n", block)
    return block if block.endswith(b"\r\n") or not block else block + b"\r\n"
