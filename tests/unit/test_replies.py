"""Specification of SMTP replies: parsing upstream answers, and the replies the proxy sends."""

from __future__ import annotations

import re

import pytest

from smtpbalancer import replies
from smtpbalancer.replies import Reply, queued, upstream_queue_id


@pytest.mark.parametrize(
    ("code", "message", "status", "text"),
    [
        (250, "2.0.0 Ok: queued as 8BDCA22DA71", "2.0.0", "Ok: queued as 8BDCA22DA71"),
        (550, "5.1.1 <bob@example.net>: User unknown", "5.1.1", "<bob@example.net>: User unknown"),
        (451, "4.7.1", "4.7.1", ""),
        (250, "Ok", "", "Ok"),
        (550, "No such user", "", "No such user"),
        (421, "", "", ""),
        (550, "5.1.1 first line\n5.1.1 second  line", "5.1.1", "first line 5.1.1 second line"),
        (
            450,
            "4.2.0 Greylisted,\r\n   see\thttp://x.test",
            "4.2.0",
            "Greylisted, see http://x.test",
        ),
        (550, "  5.7.1  spaced out  ", "5.7.1", "spaced out"),
        (554, "5.7.1234 not a status", "", "5.7.1234 not a status"),
        (250, "2.0.0Ok", "", "2.0.0Ok"),
        (550, "3.1.1 wrong class", "", "3.1.1 wrong class"),
        (550, "Error 5.1.1 later", "", "Error 5.1.1 later"),
        (250, "2.0.100 three digits", "2.0.100", "three digits"),
    ],
)
def test_parse(code: int, message: str, status: str, text: str) -> None:
    assert Reply.parse(code, message) == Reply(code, status, text)


@pytest.mark.parametrize(
    ("reply", "line"),
    [
        (Reply(250, "2.0.0", "OK"), "250 2.0.0 OK"),
        (Reply(550, "", "No such user"), "550 No such user"),
        (Reply(451, "4.4.2", ""), "451 4.4.2"),
        (Reply(221, "", ""), "221"),
    ],
)
def test_line_is_the_wire_form(reply: Reply, line: str) -> None:
    assert reply.line == line


@pytest.mark.parametrize(
    ("code", "ok", "transient", "permanent", "effective_status"),
    [
        (250, True, False, False, "2.0.0"),
        (354, True, False, False, "3.0.0"),
        (421, False, True, False, "4.0.0"),
        (452, False, True, False, "4.0.0"),
        (550, False, False, True, "5.0.0"),
        (554, False, False, True, "5.0.0"),
    ],
)
def test_reply_classes(
    code: int, ok: bool, transient: bool, permanent: bool, effective_status: str
) -> None:
    reply = Reply(code, "", "x")
    assert (reply.ok, reply.transient, reply.permanent) == (ok, transient, permanent)
    assert reply.effective_status == effective_status


def test_effective_status_prefers_the_given_one() -> None:
    assert Reply(550, "5.1.1", "User unknown").effective_status == "5.1.1"


def test_queued_is_the_postfix_shape_with_the_id_last() -> None:
    line = queued("0197A1B2C3D4E5F60718")
    assert line == "250 2.0.0 Ok: queued as 0197A1B2C3D4E5F60718"
    assert line.split()[-1] == "0197A1B2C3D4E5F60718"
    assert upstream_queue_id(line) == "0197A1B2C3D4E5F60718"


@pytest.mark.parametrize(
    ("text", "queue_id"),
    [
        ("2.0.0 Ok: queued as 8BDCA22DA71", "8BDCA22DA71"),
        ("Ok: queued as 4BRcTq0Qz1z9sWh", "4BRcTq0Qz1z9sWh"),
        ("2.0.0 OK QUEUED AS abc-123 (took 2ms)", "abc-123"),
        ("2.0.0 Ok: queued as <id@relay.example>", "<id@relay.example>"),
        ("2.0.0 OK id=1abcde-000001-AB", ""),
        ("Ok: queued as", ""),
        ("", ""),
    ],
)
def test_upstream_queue_id(text: str, queue_id: str) -> None:
    assert upstream_queue_id(text) == queue_id


OUR_REPLIES = [
    value for name, value in vars(replies).items() if name.isupper() and isinstance(value, Reply)
]


@pytest.mark.parametrize("reply", OUR_REPLIES, ids=lambda r: r.line)
def test_every_reply_we_originate_has_an_enhanced_status_of_its_class(reply: Reply) -> None:
    assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", reply.status)
    assert reply.status[0] == str(reply.code)[0]
    assert reply.text
    assert Reply.parse(reply.code, f"{reply.status} {reply.text}") == reply


def test_there_are_replies_to_check() -> None:
    assert len(OUR_REPLIES) >= 12
