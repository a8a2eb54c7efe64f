"""The record factory `configure` installs builds exactly what logging.LogRecord builds."""

from __future__ import annotations

import logging
import sys
import time

import pytest

from smtpbalancer.logs import _record, configure

pytestmark = pytest.mark.skipif(
    sys.version_info[:2] != (3, 11), reason="configure installs the factory on 3.11 only"
)

UNKNOWN = ("(unknown file)", 0, "(unknown function)")


def exc_info() -> tuple[type[BaseException], BaseException, object]:
    try:
        raise ValueError("boom")
    except ValueError:
        return sys.exc_info()  # type: ignore[return-value]


CASES: list[tuple[object, ...]] = [
    ("smtpbalancer.delivery.dispatcher", logging.INFO, *UNKNOWN[:2], "a.b x=%s", ("y",), None),
    ("x", logging.ERROR, *UNKNOWN[:2], "a.b", (), exc_info(), UNKNOWN[2], "Stack: here"),
    ("x", 5, *UNKNOWN[:2], "a.b", (), None, None, None),
    ("x", logging.INFO, *UNKNOWN[:2], 42, (), None),
    ("x", logging.INFO, *UNKNOWN[:2], "a.b x=%(x)s", ({"x": 1},), None),  # LogRecord's own
    ("x", logging.INFO, *UNKNOWN[:2], "a.b x=%s", ({},), None),
    ("x", logging.INFO, *UNKNOWN[:2], "a.b x=%s", ([1],), None),
    ("x", logging.INFO, __file__, 12, "a.b", (), None, "f"),  # a real path: LogRecord's own
    ("x", logging.INFO, "", 0, "", (), None, None),  # what makeLogRecord passes
]


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_750_000_000.987654)
    monkeypatch.setattr(logging, "logThreads", False)
    monkeypatch.setattr(logging, "logProcesses", False)
    monkeypatch.setattr(logging, "logMultiprocessing", False)


@pytest.mark.usefixtures("frozen")
@pytest.mark.parametrize("args", CASES)
def test_the_same_attributes_in_the_same_order(args: tuple[object, ...]) -> None:
    expected = logging.LogRecord(*args)  # type: ignore[arg-type]
    record = _record(*args)  # type: ignore[arg-type]
    assert type(record) is logging.LogRecord
    assert list(vars(record).items()) == list(vars(expected).items())
    assert record.getMessage() == expected.getMessage()


@pytest.mark.usefixtures("frozen")
@pytest.mark.parametrize("flag", ["logThreads", "logProcesses", "logMultiprocessing"])
def test_threads_and_processes_turned_back_on_are_looked_up(
    monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    monkeypatch.setattr(logging, flag, True)
    record = _record("x", logging.INFO, "(unknown file)", 0, "a.b", (), None)
    expected = logging.LogRecord("x", logging.INFO, "(unknown file)", 0, "a.b", (), None)
    assert list(vars(record).items()) == list(vars(expected).items())


def test_loggers_extra_and_caplog_see_the_same_record(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(logging, "_srcfile", None)
    monkeypatch.setattr(logging, "_logRecordFactory", _record)
    log = logging.getLogger("tests.record")
    with caplog.at_level(logging.INFO, logger="tests.record"):
        log.info("delivery.delivered queue_id=%s", "Q", extra={"tag": 7})
        with pytest.raises(KeyError):  # LogRecord's attributes cannot be overwritten by extra
            log.info("a.b", extra={"msecs": 1})
    [record] = caplog.records
    assert record.getMessage() == "delivery.delivered queue_id=Q"
    assert (record.filename, record.module, record.funcName) == ("(unknown file)",) * 2 + (
        "(unknown function)",
    )
    assert record.tag == 7  # type: ignore[attr-defined]
    assert caplog.messages == ["delivery.delivered queue_id=Q"]


@pytest.fixture
def logging_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever `configure` changes comes back after the test."""
    for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())
    root, mail = logging.getLogger(), logging.getLogger("mail.log")
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(mail, "level", mail.level)


@pytest.mark.usefixtures("logging_state")
def test_configure_installs_the_factory_in_place_of_logrecord_only() -> None:
    logging.setLogRecordFactory(logging.LogRecord)
    configure("INFO", "json")
    assert logging.getLogRecordFactory() is _record

    def custom(*args: object, **kwargs: object) -> logging.LogRecord:
        return logging.LogRecord(*args, **kwargs)  # type: ignore[arg-type]

    logging.setLogRecordFactory(custom)
    configure("INFO", "json")
    assert logging.getLogRecordFactory() is custom  # someone else's: left alone
