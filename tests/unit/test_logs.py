"""The JSON log formatter: event names, key=value fields, numbers, quoting, exceptions."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from smtpbalancer.logs import JsonFormatter, parse_message


def render(msg: str, *args: object, level: int = logging.INFO, exc: bool = False) -> dict:
    record = logging.LogRecord(
        "smtpbalancer.delivery.dispatcher", level, __file__, 1, msg, args, None
    )
    if exc:
        try:
            raise ValueError("boom ✓")
        except ValueError:
            record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert isinstance(doc, dict)
    return doc


def test_fields_are_parsed_and_numbers_are_numbers() -> None:
    doc = render(
        "delivery.delivered queue_id=%s upstream=%s rcpts=%d upstream_queue_id=%s",
        "0193A1B2C3D4E5F60718",
        "relay-a",
        3,
        "8BDCA22DA71",
    )
    assert doc["event"] == "delivery.delivered"
    assert doc["queue_id"] == "0193A1B2C3D4E5F60718"
    assert doc["upstream"] == "relay-a"
    assert doc["rcpts"] == 3
    assert doc["upstream_queue_id"] == "8BDCA22DA71"
    assert doc["level"] == "INFO"
    assert doc["logger"] == "smtpbalancer.delivery.dispatcher"
    assert doc["ts"].endswith("Z") and doc["ts"][10] == "T"
    assert doc["message"].startswith("delivery.delivered queue_id=0193A1B2C3D4E5F60718 ")


def test_quoted_reply_with_spaces_and_quotes_is_one_field() -> None:
    reply = """451 4.3.0 it's "busy", try later"""
    doc = render("delivery.deferred queue_id=%s rcpts=%d reply=%r", "Q", 2, reply)
    assert doc["reply"] == reply
    assert doc["rcpts"] == 2


def test_the_last_value_runs_to_the_end_of_the_line_and_arrows_become_from_to() -> None:
    doc = render(
        "upstream.breaker upstream=%s %s->%s reason=%s", "relay-b", "closed", "open", "5 failures"
    )
    assert doc["upstream"] == "relay-b"
    assert (doc["from"], doc["to"]) == ("closed", "open")
    assert doc["reason"] == "5 failures"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x.y a=1 b=-2 c=0.25 d=1e3 e=True f=False g=60.0s h=1.2.3.4", None),
        ("x.y inflight=3 action=stay-spooled", {"inflight": 3, "action": "stay-spooled"}),
    ],
)
def test_scalars(text: str, expected: dict | None) -> None:
    event, fields = parse_message(text)
    assert event == "x.y"
    if expected is None:
        assert fields == {
            "a": 1,
            "b": -2,
            "c": 0.25,
            "d": 1000.0,
            "e": True,
            "f": False,
            "g": "60.0s",
            "h": "1.2.3.4",
        }
    else:
        assert fields == expected


def test_non_ascii_is_kept_readable() -> None:
    doc = render("smtp.relay_denied client=%s rcpt_domain=%s", "192.0.2.1", "bücher.example")
    assert doc["rcpt_domain"] == "bücher.example"
    line = JsonFormatter().format(
        logging.LogRecord("x", logging.INFO, __file__, 1, "a.b d=%s", ("é",), None)
    )
    assert "é" in line  # not \\u00e9


def test_a_line_without_an_event_name_keeps_only_the_message() -> None:
    doc = render("Task was destroyed but it is pending! x=1")
    assert doc["event"] is None
    assert "x" not in doc
    assert doc["message"] == "Task was destroyed but it is pending! x=1"


def test_reserved_names_do_not_shadow_the_envelope() -> None:
    doc = render("a.b level=%s message=%s ts=%s", "low", "hi", "now")
    assert doc["level"] == "INFO"
    assert (doc["level_"], doc["message_"], doc["ts_"]) == ("low", "hi", "now")


def test_exception_info_is_one_field() -> None:
    doc = render("delivery.crashed queue_id=%s", "Q", level=logging.ERROR, exc=True)
    assert doc["exc_type"] == "ValueError"
    assert "Traceback" in doc["exc"] and "boom ✓" in doc["exc"]
    assert doc["queue_id"] == "Q"
    assert doc["level"] == "ERROR"


def test_a_one_word_event_needs_key_value_pairs() -> None:
    event, fields = parse_message("reload generation=7 changed=upstreams.relay-b.weight")
    assert (event, fields) == ("reload", {"generation": 7, "changed": "upstreams.relay-b.weight"})
    assert parse_message("starting up now") == (None, {})
