"""The JSON formatter's fast path writes, byte for byte, what its general path writes.

The general path (`JsonFormatter._document`: `parse_message` or the template's fields, a dict,
the JSON encoder) is the oracle. Every format string the package logs with, and a seeded mix
of made-up ones, go through both with awkward values; the lines must be equal, or both calls
must raise the same exception.
"""

from __future__ import annotations

import ast
import enum
import logging
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import smtpbalancer
from smtpbalancer.logs import JsonFormatter

_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


class Colour(enum.StrEnum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 7


class Text(str):
    def __str__(self) -> str:
        return "not the value"


VALUES: list[object] = [
    "",
    "plain",
    "01A2210CD12D67859838",
    "0123E45",
    "relay-a",
    "has space",
    " lead",
    "trail ",
    "'quoted",
    '"dq',
    'it\'s "both"',
    "k=v",
    "a=b c=d",
    "tab\there",
    "nl\n",
    "\r",
    "\x00",
    "\x1f",
    "\x7f",
    "\x1b[31m",
    "é",
    "bücher.example",
    "日本語",
    "😀",
    "\ud800",
    "a\udcffb",
    "\u2028",
    "\u00a0",
    "\ufeff",
    "\u0661\u0662\u0663",  # Arabic-Indic digits: `\d` and int() take them
    "\u0663.\u0665",
    "²",
    "+5",
    "-0",
    "007",
    ".5",
    "5.",
    "-.5e-3",
    "1e5",
    "1E+5",
    "1e999",
    "-1e999",
    "9" * 30,
    "1" * 5000,  # int() refuses it: both paths must raise
    "nan",
    "NaN",
    "inf",
    "Infinity",
    "True",
    "False",
    "true",
    "None",
    "null",
    "1.2.3.4",
    "0x10",
    "1_000",
    "closed->open",
    "\\",
    "\\u00e9",
    "%s",
    "%",
    0,
    1,
    -1,
    2**63,
    10**40,
    True,
    False,
    None,
    0.0,
    -0.0,
    1.5,
    0.1,
    7.25,
    1e16,
    1e-7,
    float("nan"),
    float("inf"),
    float("-inf"),
    ValueError("x y"),
    ValueError("x"),
    OSError(28, "No space left on device"),
    b"bytes",
    ["a", 1],
    ("t",),
    {"a": 1},
    Colour.RED,
    Size.BIG,
    Text("text"),
]


def call_site_formats() -> list[str]:
    """The constant format string of every `log.<level>(...)` call in the package."""
    formats: set[str] = set()
    for path in Path(smtpbalancer.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _LOG_METHODS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                formats.add(node.args[0].value)
    return sorted(formats)


MADE_UP_FORMATS = [
    "x.y a=%s",
    "x.y a=%s b=%s",
    "x.y a=%r b=%s",
    "x.y a=%d b=%d",
    "x.y a=%s a=%s",
    "x.y level_=%s level=%s",
    "x.y level=%s message=%s ts=%s event=%s exc=%s exc_type=%s logger=%s",
    "x.y stack=%s from=%s to=%s",
    "x.y a=%.1fs b=%.2f/s c=%f",
    "x.y id=%s-%d address=%s:%d",
    "x.y a=%5s b=%-5s c=%05d d=%+d e=%.0f f=%#r",
    "x.y action=stay-spooled a=%s",
    "x.y a=%s action=",
    "x.y a=%s n=5 f=1e3 t=True q='x'",
    "x.y a=%s x=é",
    'x.y a=%s x=say"hi" y=%s',
    "x.y a=%s x=C:\\dir y=%s",
    "x.y a=%s  b=%s",
    "x.y a=%s %s->%s",
    "x.y a=%s reason=%s",
    "reload generation=%d changed=%s",
    "reload %s",
    "Reload a=%s",
    "a.b.c_d a=%s",
    "prose %s here",
    "%s",
    "x.y",
]


def make_record(
    msg: object, args: object, *, name: str, level: int, created: float
) -> logging.LogRecord:
    record = logging.LogRecord(name, level, "(unknown file)", 0, msg, None, None)
    record.args = args  # type: ignore[assignment]  # as given, even a lone mapping
    record.created = created
    return record


def conversions(msg: str) -> int:
    return msg.replace("%%", "").count("%")


def cases(rng: random.Random) -> Iterator[tuple[object, object]]:
    formats = call_site_formats() + MADE_UP_FORMATS
    for msg in formats:
        n = conversions(msg)
        yield msg, ()
        for value in VALUES:
            yield msg, (value,) * n
        for _ in range(40):
            yield msg, tuple(rng.choice(VALUES) for _ in range(n))
        yield msg, tuple(rng.choice(VALUES) for _ in range(n + 1))  # one too many
        if n:
            yield msg, tuple(rng.choice(VALUES) for _ in range(n - 1))  # one short
    yield "x.y a=%(a)s", {"a": 1}
    yield "x.y a=%s", ["list", "args"]
    yield 42, ()
    yield Text("x.y a=%s"), ("v",)


class Counting(JsonFormatter):
    """Counts the records its fast path leaves to the general path."""

    general = 0

    def _document(self, record: logging.LogRecord) -> str:
        self.general += 1
        return super()._document(record)


def render(formatter: JsonFormatter, record: logging.LogRecord, oracle: bool) -> str:
    if oracle:
        return formatter._document(record)
    return formatter.format(record)


def outcome(formatter: JsonFormatter, record: logging.LogRecord, oracle: bool) -> str:
    try:
        return render(formatter, record, oracle)
    except Exception as exc:
        return f"raised {type(exc).__name__}"


def test_fast_lines_equal_general_lines() -> None:
    rng = random.Random(6)
    fast, oracle = Counting(), JsonFormatter()
    names = ["smtpbalancer.delivery.dispatcher", "asyncio", "mail.log", 'tëst"name', ""]
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, 25]
    created = 1_750_000_000.0
    compared = 0
    for msg, args in cases(rng):
        for _ in range(2):  # the first call compiles the template, the second uses it
            created += rng.choice([0.0, 0.0004, 0.0996, 0.9999996, 1.0, 86_400.0])
            record = make_record(
                msg, args, name=rng.choice(names), level=rng.choice(levels), created=created
            )
            expected = outcome(oracle, record, oracle=True)
            assert outcome(fast, record, oracle=False) == expected, (msg, args)
            compared += 1
    assert compared > 10_000
    assert compared - fast.general > 1_000  # the fast path had its share


def plain_args(msg: str) -> tuple[object, ...]:
    """Plain values for a format string: 7 for each %d, 7.5 for a float, else a word."""
    conversions = re.findall(r"%[-+#0.\d]*([sdfr])", msg)
    return tuple({"d": 7, "f": 7.5}.get(conv, "plain") for conv in conversions)


@pytest.mark.parametrize("msg", [m for m in call_site_formats() + MADE_UP_FORMATS if "%" in m])
def test_plain_values_take_the_fast_path(msg: str) -> None:
    """Where `fields` takes the values and has a str for each (an int for a bare %d), and no
    repeated name, %r or escaped constant needs the dict, the fast path writes the line."""
    formatter = Counting()
    args = plain_args(msg)
    record = make_record(msg, args, name="x", level=logging.INFO, created=1.0)
    assert formatter.format(record) == JsonFormatter()._document(record)
    template = formatter._templates[msg]
    fields = template.fields(args) if template is not None else None
    expected_fast = (
        template is not None
        and fields is not None
        and len(fields) == len(template.parts)
        and "%r" not in msg
        and '"' not in msg  # a constant JSON escapes
        and "\\" not in msg
        and all(
            fmt == "%d" or type(fields[name]) is str for name, fmt, takes in template.parts if takes
        )
    )
    assert formatter.general == (0 if expected_fast else 1)


def test_call_sites_are_found() -> None:
    formats = call_site_formats()
    assert "delivery.delivered queue_id=%s upstream=%s rcpts=%d upstream_queue_id=%s" in formats
    assert len(formats) > 50


@pytest.mark.parametrize("kind", ["exc_info", "exc_text", "stack_info", "no_exception"])
def test_exceptions_and_stacks_take_the_general_path_unchanged(kind: str) -> None:
    record = make_record(
        "delivery.crashed queue_id=%s", ("Q",), name="x", level=logging.ERROR, created=1.5
    )
    if kind == "exc_info":
        try:
            raise ValueError("boom ✓")
        except ValueError:
            record.exc_info = sys.exc_info()
    elif kind == "exc_text":
        record.exc_text = "Traceback: earlier"
    elif kind == "stack_info":
        record.stack_info = "Stack (most recent call last): here"
    else:
        record.exc_info = (None, None, None)
    assert JsonFormatter().format(record) == JsonFormatter()._document(record)


def test_the_delivery_line_takes_the_fast_path() -> None:
    formatter = JsonFormatter()
    msg = "delivery.delivered queue_id=%s upstream=%s rcpts=%d upstream_queue_id=%s"
    record = make_record(msg, ("Q", "s1", 1, ""), name="d", level=logging.INFO, created=0.25)
    formatter.format(record)
    template = formatter._templates[msg]
    assert template is not None and template.fast is not None
    check, _ = template.fast
    assert check.fullmatch(record.getMessage())
