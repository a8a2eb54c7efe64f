"""Log output: the text format and one JSON object per line, both on stderr.

Our log calls stay `log.info("event.name key=%s key=%s", ...)`; the JSON
formatter parses the *formatted* message instead of every call site changing:

- `event`: the first word when it looks like `area.name` (lower case, dotted;
  a single word such as `reload` only when key=value pairs follow), else null
  (third-party loggers such as asyncio).
- `key=value` words become fields. A value is one word, or a quoted string as
  `%r` writes it (`reply='451 4.3.0 try later'`); the value of the *last* key
  runs to the end of the line, so `reason=probes failed, last: timeout` stays
  whole. Integers and floats become JSON numbers, True/False booleans. A bare
  `closed->open` word becomes `from`/`to`.
- `message`: the whole formatted message, so a grep or regex written against
  the text format still matches, and nothing is lost when a line does not
  follow the convention.
- `ts` (RFC 3339, UTC, milliseconds), `level`, `logger`; `exc_type` and `exc`
  (the formatted traceback) when the record carries exception info.

Field names that would shadow these get a trailing underscore (`level_`).
Nothing here decides *what* is logged: bodies and AUTH data never reach a log
call in the first place (see frontend/auth.py).
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Final

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"
FORMATS: Final = ("json", "text")
_RESERVED: Final = frozenset({"ts", "level", "logger", "event", "message", "exc", "exc_type"})
_EVENT = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*")
_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=")
_NEXT_KEY = re.compile(r" [A-Za-z_][A-Za-z0-9_]*=")
_TRANSITION = re.compile(r"([a-z_]+)->([a-z_]+)")
_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")

Scalar = str | int | float | bool | None


def parse_message(text: str) -> tuple[str | None, dict[str, Scalar]]:
    """Split a formatted log message into its event name and key=value fields."""
    head, _, rest = text.partition(" ")
    if _EVENT.fullmatch(head) is None or ("." not in head and _KEY.search(rest) is None):
        return None, {}  # prose; a one-word event (`reload generation=7`) needs a key=value
    fields: dict[str, Scalar] = {}
    pos, end = 0, len(rest)
    while pos < end:
        if rest[pos] == " ":
            pos += 1
            continue
        key = _KEY.match(rest, pos)
        if key is None:
            word_end = _word_end(rest, pos)
            arrow = _TRANSITION.fullmatch(rest, pos, word_end)
            if arrow is not None:
                fields.setdefault("from", arrow.group(1))
                fields.setdefault("to", arrow.group(2))
            pos = word_end
            continue
        name = key.group(1)
        if name in _RESERVED:
            name += "_"
        start = key.end()
        if start < end and rest[start] in "'\"":
            value_end = _quoted_end(rest, start)
            fields[name] = _unquote(rest[start:value_end])
        elif _NEXT_KEY.search(rest, start) is None:  # the last key: its value is the rest
            value_end = end
            fields[name] = _scalar(rest[start:].strip())
        else:
            value_end = _word_end(rest, start)
            fields[name] = _scalar(rest[start:value_end])
        pos = value_end
    return head, fields


def _word_end(text: str, pos: int) -> int:
    space = text.find(" ", pos)
    return len(text) if space < 0 else space


def _quoted_end(text: str, start: int) -> int:
    """Index just past the closing quote of the literal at `start` (or the end of text)."""
    quote, i = text[start], start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            return i + 1
        i += 1
    return len(text)


def _unquote(literal: str) -> str:
    try:
        value = ast.literal_eval(literal)  # literals only: never evaluates code
    except (ValueError, SyntaxError):
        return literal
    return value if isinstance(value, str) else literal


def _scalar(word: str) -> Scalar:
    if _INT.fullmatch(word):
        return int(word)
    if _FLOAT.fullmatch(word):
        return float(word)
    if word in ("True", "False"):
        return word == "True"
    return word


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        event, fields = parse_message(text)
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        doc: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": event,
            **fields,
            "message": text,
        }
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc_type"] = record.exc_info[0].__name__
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure(level: str, fmt: str) -> None:
    """Send every log record to stderr in `fmt` ("json" or "text") at `level` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's protocol log
