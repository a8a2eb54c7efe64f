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

Cost (one INFO line per delivered message, on the event loop): a format string
made only of `key=%s`-style words is compiled once into a template. When the
formatted message shows each value as a plain word that stays a string (or a
%d's number), which a regex compiled with the template tells, `layout % args`
writes the JSON members: no dict, no encoder. Otherwise a record whose values
are single words takes its fields straight from its args instead of
re-parsing the formatted text, and anything else (quoted or spaced values,
arrows, prose) goes through `parse_message`; all three write the same bytes
(tests/unit/test_logs_equivalence.py). The timestamp's date and time are
formatted once per second, the level and logger once per pair. `configure`
turns off what no format here prints: caller lookup, thread and process names;
on Python 3.11 it also installs `_record`, which builds the same LogRecord
without the file-name work that lookup being off leaves pointless.

Writes: on an event loop's thread, the lines of one loop turn go to stderr in one
write (`TurnHandler`), flushed by a callback the first line of the turn schedules,
so a busy worker pays one write system call per turn instead of one per delivery.
A line waits at most for the rest of its turn; a kill -9 can lose that much, which
the spool's at-least-once guarantee never depends on. Off the loop (threads, the
CLI) every line is written at once, after anything still waiting.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Final, TextIO

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


# A template word: `key=` and a value with at most one %-conversion and no space.
_TEMPLATE_WORD = re.compile(
    r"([A-Za-z_][A-Za-z0-9_]*)=([^ %]*(?:%[-+#0]?\d*(?:\.\d+)?[sdfr][^ %]*)?)"
)
_TEMPLATES_MAX: Final = 1024  # format strings are code constants; this only bounds a misuse
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, default=str)
# What _ENCODER does to a str (its C encoder calls this very function): no \u escapes.
_encode_str: Final = json.encoder.encode_basestring

_MILLIS: Final = tuple(f"{ms:03d}" for ms in range(1000))
# (field name, value format, whether it takes an arg) per key=value word of a format string
_Part = tuple[str, str, bool]
# A value the fast path writes as a JSON string as it stands: one `fields` takes (no leading
# quote, no space) and `_scalar` leaves a str (no True or False, no number: `_NUMBER` is `_FLOAT`
# made possessive, the same words without the backtracking), with nothing JSON would escape
# (quote, backslash, control characters) and no DEL, which str.isprintable refuses.
_NUMBER: Final = r"[-+]?+(?:\d++(?:\.\d*+)?+|\.\d++)(?:[eE][-+]?+\d++)?+"
_STRING_VALUE: Final = rf"(?!(?:True|False|{_NUMBER})(?: |\Z))(?!['\"])[^ \"\\\x00-\x1f\x7f]*+"
_INT_VALUE: Final = r"(?:0|-?[1-9][0-9]*)"  # what %d writes and int() gives back unchanged


class _Template:
    """A format string made only of key=value words, compiled once (see the module docstring).

    `fields` gives the fields from the args. The fast path does without them: `check` is a
    regex the formatted message matches only when every value is one plain word that `fields`
    would keep as a str (or, for a bare %d, an int), and `layout % args` then writes the JSON
    members from "event" on, as the encoder would for `fields(args)`. As the check refuses in
    values what JSON escapes, each value and the message are their own JSON text once the caller
    has checked that a non-ASCII message is printable.
    """

    __slots__ = ("event", "fast", "nargs", "parts")

    def __init__(self, event: str, parts: tuple[_Part, ...], keys: tuple[str, ...]) -> None:
        self.event = event
        self.parts = parts  # `keys` are their names as the message writes them
        self.nargs = sum(takes for _, _, takes in parts)
        self.fast = self._fast(event, parts, keys)

    @staticmethod
    def _fast(
        event: str, parts: tuple[_Part, ...], keys: tuple[str, ...]
    ) -> tuple[re.Pattern[str], str] | None:
        """(check, layout), or None where only `fields` can tell."""
        if len({name for name, _, _ in parts}) != len(parts):
            return None  # a repeated name keeps its first place and its last value: the dict's
        check, layout = [re.escape(event)], [f'"event": {_encode_str(event)}']
        for (name, fmt, takes), key in zip(parts, keys, strict=True):
            member = f", {_encode_str(name)}: "
            if not takes:  # a constant: checked here, once
                if fmt[:1] in ("'", '"') or " " in fmt or not fmt.isprintable():
                    return None  # `fields` never takes it
                if '"' in fmt or "\\" in fmt:
                    return None  # the message's JSON would escape it
                check.append(re.escape(f" {key}={fmt}"))
                layout.append(member + _ENCODER.encode(_scalar(fmt)))  # holds no %
            elif fmt == "%r":
                return None  # the value is the str, not the repr the message shows
            elif fmt == "%d":
                check.append(f" {key}={_INT_VALUE}")
                layout.append(member + fmt)
            else:
                check.append(f" {key}={_STRING_VALUE}")
                layout.append(f'{member}"{fmt}"')
        return re.compile("".join(check)), "".join(layout)

    @classmethod
    def compile(cls, msg: str) -> _Template | None:
        head, _, rest = msg.partition(" ")
        if _EVENT.fullmatch(head) is None or (not rest and "." not in head):
            return None
        parts: list[_Part] = []
        keys: list[str] = []
        for word in rest.split(" ") if rest else ():
            found = _TEMPLATE_WORD.fullmatch(word)
            if found is None:
                return None  # prose, an arrow, a double space: the general parser
            name, fmt = found.groups()
            parts.append((f"{name}_" if name in _RESERVED else name, fmt, "%" in fmt))
            keys.append(name)
        return cls(head, tuple(parts), tuple(keys))

    def fields(self, args: tuple[object, ...]) -> dict[str, Scalar] | None:
        """What `parse_message` would make of the formatted message, or None when a value
        is not one plain word (then the caller parses the text)."""
        if len(args) != self.nargs:
            return None
        fields: dict[str, Scalar] = {}
        i = 0
        for name, fmt, takes in self.parts:
            if not takes:
                word = fmt
            else:
                arg = args[i]
                i += 1
                if fmt == "%r":  # a repr of a str is a quoted literal that unquotes to it
                    if type(arg) is not str:
                        return None
                    fields[name] = arg
                    continue
                if fmt == "%d" and type(arg) is int:
                    fields[name] = arg
                    continue
                try:
                    word = fmt % (arg,)
                except (TypeError, ValueError):
                    return None
            if word[:1] in ("'", '"') or " " in word or not word.isprintable():
                return None
            fields[name] = _scalar(word) if word else word
        return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._templates: dict[str, _Template | None] = {}
        self._second: tuple[int, str] = (-1, "")  # a whole second and its RFC 3339 text
        self._ts_head: tuple[int, str] = (-1, "")  # a second and `{"ts": "` + its text + `.`
        # `"level": ..., "logger": ..., ` per level name, per logger name
        self._envelopes: dict[str, dict[str, str]] = {}

    def format(self, record: logging.LogRecord) -> str:
        msg, args = record.msg, record.args
        if (
            type(msg) is str
            and type(args) is tuple
            and args
            and not (record.exc_info or record.exc_text or record.stack_info)
        ):
            try:
                template = self._templates[msg]
            except KeyError:
                template = self._compile(msg)
            if template is not None and template.fast is not None:
                # LogRecord.getMessage, inline; first, so that where it raises, it raises first
                text = msg % args if type(record) is logging.LogRecord else record.getMessage()
                check, layout = template.fast
                # The check refuses, in values, what JSON escapes and DEL, and the rest of the
                # text has none: an ASCII text it takes is printable and its own JSON string.
                if (text.isascii() or text.isprintable()) and check.fullmatch(text):
                    return f'{self._head(record)}{layout % args}, "message": "{text}"}}'
        return self._document(record)

    def _document(self, record: logging.LogRecord) -> str:
        """The general path: a dict of whatever the record holds, through the encoder."""
        text = record.getMessage()
        event, fields = self._parse(record, text)
        doc: dict[str, object] = {
            "ts": self._timestamp(record.created),
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
        return _ENCODER.encode(doc)

    def _compile(self, msg: str) -> _Template | None:
        template = _Template.compile(msg)
        if len(self._templates) < _TEMPLATES_MAX:
            self._templates[msg] = template
        return template

    def _parse(self, record: logging.LogRecord, text: str) -> tuple[str | None, dict[str, Scalar]]:
        msg, args = record.msg, record.args
        if type(msg) is str and type(args) is tuple and args:
            try:
                template = self._templates[msg]
            except KeyError:
                template = self._compile(msg)
            if template is not None:
                fields = template.fields(args)
                if fields is not None:
                    return template.event, fields
        return parse_message(text)

    def _head(self, record: logging.LogRecord) -> str:
        """`{"ts": ..., "level": ..., "logger": ..., ` as the encoder writes them."""
        micros = round(record.created * 1_000_000)  # as in _timestamp
        second, ts_head = self._ts_head
        if micros // 1_000_000 != second:
            ts_head = f'{{"ts": "{self._timestamp(record.created)[:-4]}'
            self._ts_head = (micros // 1_000_000, ts_head)
        try:
            envelope = self._envelopes[record.levelname][record.name]
        except KeyError:
            envelope = self._envelope(record.levelname, record.name)
        return f'{ts_head}{_MILLIS[micros % 1_000_000 // 1000]}Z", {envelope}'

    def _envelope(self, levelname: str, name: str) -> str:
        envelope = _ENCODER.encode({"level": levelname, "logger": name})[1:-1] + ", "
        by_name = self._envelopes.setdefault(levelname, {})
        if len(by_name) < _TEMPLATES_MAX:
            by_name[name] = envelope
        return envelope

    def _timestamp(self, created: float) -> str:
        """RFC 3339 in UTC with milliseconds (truncated, like datetime.isoformat)."""
        micros = round(created * 1_000_000)
        second, micros = divmod(micros, 1_000_000)
        cached, head = self._second
        if second != cached:
            head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, head)
        return f"{head}.{micros // 1000:03d}Z"


class TurnHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that writes the lines of one event-loop turn in one write."""

    MAX_WAITING: Final = 512  # lines; a turn that logs more writes them as it goes

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # where a flush is scheduled
        # Handler.acquire and release, without their two calls a turn; the lock stays this
        # object (a fork re-initialises it in place).
        assert self.lock is not None
        self._lock = self.lock
        self._flush_soon = self._flush_turn  # bound once, not once a turn

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle holds self.lock around this call.
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._waiting.append(line)
        loop = asyncio._get_running_loop()
        if loop is None or (self._loop is not None and loop is not self._loop):
            if self._loop is not None and self._loop.is_closed():
                self._loop = None  # its flush never runs: this write took its lines
            self._write_waiting()
        elif self._loop is None:
            self._loop = loop
            loop.call_soon(self._flush_soon)
        elif len(self._waiting) >= self.MAX_WAITING:
            self._write_waiting()

    def flush(self) -> None:
        with self._lock:
            self._write_waiting()

    def _flush_turn(self) -> None:
        with self._lock:
            self._loop = None
            self._write_waiting()

    def _write_waiting(self) -> None:
        stream = self.stream
        if self._waiting:
            text = "".join(self._waiting)
            self._waiting.clear()
            try:
                stream.write(text)
            except Exception:  # a closed or broken stderr must not break the caller
                return
        if stream and hasattr(stream, "flush"):  # StreamHandler.flush, under the lock we hold
            stream.flush()


_UNKNOWN_FILE: Final = "(unknown file)"  # Logger._log's pathname when it does not look
_new_record: Final = logging.LogRecord.__new__
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def _record(
    name: str,
    level: int,
    fn: str,
    lno: int,
    msg: object,
    args: tuple[object, ...] | Mapping[str, object] | None,
    exc_info: _ExcInfo | None,
    func: str | None = None,
    sinfo: str | None = None,
    **kwargs: object,  # LogRecord takes and ignores them too
) -> logging.LogRecord:
    """`logging.LogRecord(...)` as Python 3.11 builds it, without what `configure` turned off.

    A LogRecord spends half its time on os.path.basename and splitext of `fn`, which after
    `configure` is always "(unknown file)", and on the checks for threads and processes.
    This sets the same attributes in the same order on a plain LogRecord, and leaves every
    other case (a real path, a lone mapping as args, threads or processes turned back on) to
    LogRecord itself. `configure` installs it on 3.11 only, whose LogRecord.__init__ it
    follows line by line (tests/unit/test_logs_record.py compares the two).
    """
    if (
        fn != _UNKNOWN_FILE
        or logging.logThreads
        or logging.logProcesses
        or logging.logMultiprocessing
        or not isinstance(args, tuple)
        or (len(args) == 1 and isinstance(args[0], Mapping) and args[0])  # args = args[0]
    ):
        return logging.LogRecord(name, level, fn, lno, msg, args, exc_info, func, sinfo)
    ct = time.time()  # noqa: TID251 -- LogRecord's own clock, not ours to inject
    record = _new_record(logging.LogRecord)
    record.name = name
    record.msg = msg
    record.args = args
    record.levelname = logging.getLevelName(level)
    record.levelno = level
    record.pathname = fn
    record.filename = fn  # os.path.basename(fn)
    record.module = fn  # os.path.splitext(record.filename)[0]
    record.exc_info = exc_info
    record.exc_text = None
    record.stack_info = sinfo
    record.lineno = lno
    record.funcName = func  # type: ignore[assignment]  # LogRecord's own None default
    record.created = ct
    record.msecs = int((ct - int(ct)) * 1000) + 0.0
    record.relativeCreated = (ct - logging._startTime) * 1000  # type: ignore[attr-defined]
    record.thread = None
    record.threadName = None
    record.processName = None
    record.process = None
    return record


def configure(level: str, fmt: str) -> None:
    """Send every log record to stderr in `fmt` ("json" or "text") at `level` and above."""
    handler = TurnHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's protocol log
    # Neither format prints the caller, thread or process, and every record would pay for
    # looking them up (logging HOWTO, "Optimization"): a stack walk and three lookups.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if sys.version_info[:2] == (3, 11) and logging.getLogRecordFactory() is logging.LogRecord:
        logging.setLogRecordFactory(_record)  # the same records, for half the work
