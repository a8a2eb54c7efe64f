"""Specification of the RFC 3464 bounce builder: parsed back with the stdlib email package."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message

import pytest

from smtpbalancer.delivery.dsn import FailedRecipient, build_dsn, original_headers

ARRIVAL = 1_750_000_000.0
NOW = ARRIVAL + 3_600.0
HEADERS = b"From: alice@example.test\r\nTo: bob@example.net\r\nSubject: hi\r\n"
UNKNOWN = FailedRecipient(
    "bob@example.net", "5.1.1", "550 5.1.1 User unknown", "mx.example.net", NOW - 5
)
EXPIRED = FailedRecipient("carol@example.org", "4.4.7", "")


def dsn(
    *failed: FailedRecipient,
    headers: bytes = HEADERS,
    sender: str = "alice@example.test",
    reporting_mta: str = "relay.example.test",
) -> bytes:
    return build_dsn(
        reporting_mta=reporting_mta,
        queue_id="Q123",
        original_sender=sender,
        arrival_wall=ARRIVAL,
        now_wall=NOW,
        failed=failed or (UNKNOWN,),
        original_headers=headers,
        message_id="Q123.dsn@relay.example.test",
    )


def parse(out: bytes) -> EmailMessage:
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(out: bytes) -> list[EmailMessage]:
    payload = parse(out).get_payload()
    assert isinstance(payload, list)
    found = [p for p in payload if isinstance(p, EmailMessage)]
    assert len(found) == len(payload)
    return found


def status_groups(out: bytes) -> list[Message]:
    """The header groups of the message/delivery-status part: per-message first."""
    payload = parts(out)[1].get_payload()
    assert isinstance(payload, list)
    return [g for g in payload if isinstance(g, Message)]


def recipient_blocks(out: bytes) -> list[Message]:
    groups = status_groups(out)
    assert "Reporting-MTA" in groups[0]
    return groups[1:]


def text_part(out: bytes) -> str:
    text = parts(out)[0].get_content()
    assert isinstance(text, str)
    return text


def has_bare_lf(out: bytes) -> bool:
    return re.search(rb"(?<!\r)\n", out) is not None


def has_bare_cr(out: bytes) -> bool:
    return re.search(rb"\r(?!\n)", out) is not None


# --- the message as a whole --------------------------------------------------------------------


def test_is_a_multipart_report_of_three_parts_from_the_mailer_daemon_to_the_sender() -> None:
    out = dsn()
    msg = parse(out)

    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(out)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert msg["To"].addresses[0].addr_spec == "alice@example.test"
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.example.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Message-ID"] == "<Q123.dsn@relay.example.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert b"\r\nDate: Sun, 15 Jun 2025 16:06:40 GMT\r\n" in out  # from now_wall, in UTC
    assert not msg.defects


def test_output_is_deterministic() -> None:
    assert dsn(UNKNOWN, EXPIRED) == dsn(UNKNOWN, EXPIRED)


def test_uses_crlf_only() -> None:
    out = dsn(UNKNOWN, EXPIRED)
    assert not has_bare_lf(out)
    assert not has_bare_cr(out)


# --- the delivery-status part ------------------------------------------------------------------


def test_per_message_fields_name_the_reporting_mta_queue_id_and_arrival() -> None:
    per_message = status_groups(dsn())[0]

    assert per_message["Reporting-MTA"] == "dns; relay.example.test"
    assert per_message["X-Smtpbalancer-Queue-ID"] == "Q123"
    assert per_message["Arrival-Date"] == "Sun, 15 Jun 2025 15:06:40 GMT"


def test_names_exactly_the_failed_recipients_with_their_upstream_replies() -> None:
    other = FailedRecipient("dave@example.net", "5.2.2", "552 5.2.2 Mailbox full")

    blocks = recipient_blocks(dsn(UNKNOWN, other))

    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; bob@example.net",
        "rfc822; dave@example.net",
    ]
    assert [b["Action"] for b in blocks] == ["failed", "failed"]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.2.2"]
    assert [b["Diagnostic-Code"] for b in blocks] == [
        "smtp; 550 5.1.1 User unknown",
        "smtp; 552 5.2.2 Mailbox full",
    ]
    assert blocks[0]["Remote-MTA"] == "dns; mx.example.net"
    assert blocks[0]["Last-Attempt-Date"] == "Sun, 15 Jun 2025 16:06:35 GMT"
    assert "Remote-MTA" not in blocks[1]
    assert "Last-Attempt-Date" not in blocks[1]


def test_expiry_has_no_diagnostic_code_and_the_text_says_delivery_time_expired() -> None:
    out = dsn(EXPIRED)
    [block] = recipient_blocks(out)

    assert block["Status"] == "4.4.7"
    assert "Diagnostic-Code" not in block
    assert b"Diagnostic-Code" not in out
    text = text_part(out)
    assert "<carol@example.org>: delivery time expired" in text


def test_non_ascii_recipient_is_utf8_xtext_in_the_status_part_and_plain_in_the_text() -> None:
    out = dsn(FailedRecipient("jörg+x@bücher.example", "5.1.1", "550 5.1.1 no"))
    [block] = recipient_blocks(out)

    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg\\x{2B}x@b\\x{FC}cher.example"  # RFC 6533
    assert parts(out)[1].as_bytes().isascii()
    assert "<jörg+x@bücher.example>" in text_part(out)


# --- the human-readable part -------------------------------------------------------------------


def test_text_part_explains_and_lists_each_recipient_with_its_reply() -> None:
    text = text_part(dsn(UNKNOWN, EXPIRED))

    assert "This is the mail system at host relay.example.test." in text
    assert "could not be delivered to one or more recipients" in text
    assert "<bob@example.net>: host mx.example.net said: 550 5.1.1 User unknown" in text
    assert "<carol@example.org>: delivery time expired" in text


# --- the original headers part -----------------------------------------------------------------


def test_original_headers_are_attached_with_crlf_line_endings() -> None:
    out = dsn(headers=b"From: a@example.test\nSubject: lf only\n")
    part = parts(out)[2]

    assert b"From: a@example.test\r\nSubject: lf only\r\n" in out
    assert part.get_content_type() == "text/rfc822-headers"
    assert not has_bare_lf(out)


def test_original_headers_containing_the_boundary_do_not_split_the_report() -> None:
    sneaky = b"X-A: 1\r\n--Q123.dsn/relay.example.test--\r\n"
    out = dsn(headers=sneaky)

    assert parse(out).get_boundary() != "Q123.dsn/relay.example.test"
    assert len(parts(out)) == 3
    assert "\n--Q123.dsn/relay.example.test--" in parts(out)[2].get_content()


# --- hostile input -----------------------------------------------------------------------------


@pytest.mark.parametrize("breaker", ["\n", "\r", "\r\n", "\n\r\n"])
def test_line_breaks_in_inputs_cannot_inject_header_lines(breaker: str) -> None:
    evil = FailedRecipient(
        f"bob@example.net{breaker}Bcc: eve@example.test",
        "5.1.1",
        f"550 5.1.1 User unknown{breaker}Action: delivered",
        f"mx.example.net{breaker}X-Evil: 1",
    )
    out = dsn(evil, sender=f"alice@example.test{breaker}Bcc: eve@example.test")
    msg = parse(out)
    [block] = recipient_blocks(out)

    assert not has_bare_lf(out)
    assert not has_bare_cr(out)
    assert "Bcc" not in msg
    assert block.get_all("Action") == ["failed"]
    assert "X-Evil" not in block
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown Action: delivered"


# --- refusals ----------------------------------------------------------------------------------


def test_refuses_an_empty_recipient_list() -> None:
    with pytest.raises(ValueError, match="no failed recipients"):
        build_dsn(
            reporting_mta="relay.example.test",
            queue_id="Q1",
            original_sender="alice@example.test",
            arrival_wall=ARRIVAL,
            now_wall=NOW,
            failed=[],
            original_headers=HEADERS,
            message_id="m@relay.example.test",
        )


@pytest.mark.parametrize("sender", ["", "<>", " "])
def test_never_bounces_to_the_null_sender(sender: str) -> None:
    with pytest.raises(ValueError, match="null sender"):
        dsn(sender=sender)


@pytest.mark.parametrize("status", ["", "550", "5.1", "3.0.0", "5.1.1 extra"])
def test_refuses_a_status_that_is_not_an_rfc3463_code(status: str) -> None:
    with pytest.raises(ValueError, match="bad status"):
        dsn(FailedRecipient("bob@example.net", status, "550 no"))


# --- original_headers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\nB: 2\n\nbody\n", b"A: 1\nB: 2\n"),
        (b"A: 1\r\n folded\r\n\r\nbody", b"A: 1\r\n folded\r\n"),
        (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n"),  # no body at all
        (b"\r\nbody only", b""),
        (b"\nbody only", b""),
        (b"", b""),
    ],
)
def test_original_headers_stop_at_the_blank_line(message: bytes, expected: bytes) -> None:
    assert original_headers(message) == expected


def test_original_headers_respect_the_limit_and_cut_at_a_line_boundary() -> None:
    message = b"A: 1111\r\nB: 2222\r\nC: 3333\r\n\r\nbody"

    assert original_headers(message, limit=27) == b"A: 1111\r\nB: 2222\r\nC: 3333\r\n"
    assert original_headers(message, limit=26) == b"A: 1111\r\nB: 2222\r\n"
    assert original_headers(message, limit=18) == b"A: 1111\r\nB: 2222\r\n"
    assert original_headers(message, limit=17) == b"A: 1111\r\n"
    assert original_headers(message, limit=5) == b""


def test_original_headers_of_a_huge_header_block_stay_within_the_default_limit() -> None:
    message = b"X-Pad: " + b"x" * 100 + b"\r\n"
    huge = message * 1_000 + b"\r\nbody"

    head = original_headers(huge)

    assert 0 < len(head) <= 64 * 1024
    assert head.endswith(b"\r\n")
    assert huge.startswith(head)
