"""The JSON formatter's compiled templates give exactly what parsing the text gives."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import pytest

from smtpbalancer.logs import JsonFormatter, parse_message

CASES: list[tuple[str, tuple[object, ...]]] = [
    (
        "delivery.delivered queue_id=%s upstream=%s rcpts=%d upstream_queue_id=%s",
        ("01A2204A445C21D09F35", "relay-a", 3, ""),
    ),
    ("delivery.delivered queue_id=%s upstream=%s rcpts=%d upstream_queue_id=%s", ("Q", "", 1, "")),
    ("delivery.deferred queue_id=%s rcpts=%d reply=%r", ("Q", 2, '451 4.3.0 it\'s "busy"')),
    ("delivery.deferred queue_id=%s reply=%r", ("Q", ValueError("x y"))),
    (
        "delivery.retry_scheduled queue_id=%s round=%d retry_in=%.1fs tried=%s",
        ("Q", 2, 7.25, "a,b"),
    ),
    ("x.y a=%s b=%s", ("123", "True")),
    ("x.y a=%s b=%s", ("-1.5e3", "1.2.3.4")),
    ("x.y a=%s b=%s", ("has space", "last value with spaces")),
    ("x.y a=%s b=%s", ("k=v", "c=d")),
    ("x.y a=%s b=%s", ("'quoted", '"q')),
    ("x.y a=%s b=%s", ("tab\there", "nl\n")),
    ("x.y a=%s b=%s", (None, True)),
    ("x.y a=%d action=stay-spooled", (True,)),
    ("x.y level=%s message=%s ts=%s", ("low", "hi", "now")),
    ("x.y a=%s a=%s", ("1", "2")),
    ("upstream.breaker upstream=%s %s->%s reason=%s", ("r", "closed", "open", "5 fails")),
    ("reload generation=%d", (7,)),
    ("prose %s here", ("x",)),
    ("x.y a=%5s b=%s", ("1", "2")),
    ("x.y a=%s  b=%s", ("1", "2")),
    ("x.y a=%s", ("bücher.example",)),
]


def _record(msg: str, args: tuple[object, ...]) -> logging.LogRecord:
    return logging.LogRecord("smtpbalancer.x", logging.INFO, __file__, 1, msg, args, None)


@pytest.mark.parametrize(("msg", "args"), CASES)
def test_fields_match_the_text_parser(msg: str, args: tuple[object, ...]) -> None:
    formatter = JsonFormatter()
    for _ in range(2):  # the first call compiles the template, the second uses it
        record = _record(msg, args)
        doc = json.loads(formatter.format(record))
        event, fields = parse_message(record.getMessage())
        assert doc["event"] == event
        assert {
            k: v for k, v in doc.items() if k not in ("ts", "level", "logger", "event", "message")
        } == json.loads(json.dumps(fields))
        assert doc["message"] == record.getMessage()


@pytest.mark.parametrize(
    "created", [1_750_000_000.0, 1_750_000_000.1234, 1_750_000_000.9999996, 0.0005]
)
def test_timestamp_matches_datetime(created: float) -> None:
    record = _record("a.b x=%s", ("y",))
    record.created = created
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert json.loads(JsonFormatter().format(record))["ts"] == expected.replace("+00:00", "Z")
