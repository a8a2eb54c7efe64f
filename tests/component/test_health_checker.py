"""Health checks over real sockets on 127.0.0.1: a Sink, a dead port and servers that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Mapping

import pytest
from support.raw import raw_server
from support.waiting import wait_until

from smtpbalancer.clock import SystemClock
from smtpbalancer.errors import UpstreamError
from smtpbalancer.sink import Sink
from smtpbalancer.upstream.health import HealthChecker, Probe, smtp_probe

INTERVAL_S = 0.1
TIMEOUT_S = 0.5


class Changes(list[tuple[str, bool]]):
    """on_change recorder: (upstream, healthy) pairs; reasons kept apart."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[str] = []

    def __call__(self, name: str, healthy: bool, reason: str) -> None:
        self.append((name, healthy))
        self.reasons.append(reason)


def probe_for(address: tuple[str, int], timeout_s: float = TIMEOUT_S) -> Probe:
    host, port = address
    return smtp_probe(host, port, local_hostname="probe.test", timeout_s=timeout_s)


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def checking(probes: Mapping[str, Probe], changes: Changes) -> AsyncIterator[HealthChecker]:
    checker = HealthChecker(
        probes, interval_s=INTERVAL_S, fall=2, rise=2, on_change=changes, clock=SystemClock()
    )
    task = asyncio.create_task(checker.run(), name="health-checker")
    try:
        yield checker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_live_sink_stays_healthy(sinks: object) -> None:
    sink: Sink = await sinks("relay-a")  # type: ignore[operator]
    changes = Changes()
    async with checking({"relay-a": probe_for(sink.address)}, changes) as checker:
        await wait_until(lambda: sink.connections >= 4, timeout=2)
        assert checker.healthy("relay-a")
        assert repr(checker) == "<HealthChecker relay-a=up>"
    assert changes == []
    assert sink.messages == 0


async def test_dead_port_goes_down_once(caplog: pytest.LogCaptureFixture) -> None:
    changes = Changes()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with checking({"relay-b": probe_for(("127.0.0.1", dead_port()))}, changes) as checker:
        await wait_until(lambda: bool(changes), timeout=2)
        assert loop.time() - started < 4 * INTERVAL_S
        assert not checker.healthy("relay-b")
        await asyncio.sleep(3 * INTERVAL_S)  # more failed probes: still one report
        assert repr(checker).startswith("<HealthChecker relay-b=down(")
    assert changes == [("relay-b", False)]
    assert changes.reasons[0].startswith("probes failed, last: connect: ")
    [record] = [r for r in caplog.records if r.getMessage().startswith("upstream.health ")]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("upstream.health upstream=relay-b healthy=False reason=")


async def test_stopped_sink_flips_down_and_restarted_sink_flips_back_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="smtpbalancer.upstream.health")
    sink = Sink(name="relay-a")
    host, port = await sink.start()
    changes = Changes()
    try:
        async with checking({"relay-a": probe_for((host, port))}, changes) as checker:
            await wait_until(lambda: sink.connections >= 2, timeout=2)
            await sink.stop()
            await wait_until(lambda: changes == [("relay-a", False)], timeout=2)
            assert not checker.healthy("relay-a")
            await sink.start(host, port)
            await wait_until(lambda: len(changes) == 2, timeout=2)
            assert changes == [("relay-a", False), ("relay-a", True)]
            assert checker.healthy("relay-a")
    finally:
        await sink.stop()
    flips = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.getMessage().startswith("upstream.health ")
    ]
    assert [level for level, _ in flips] == [logging.WARNING, logging.INFO]
    assert flips[1][1] == "upstream.health upstream=relay-a healthy=True reason=probes succeeded"


async def test_probe_quits_and_leaves_no_connection_open(sinks: object) -> None:
    sink: Sink = await sinks("relay-a")  # type: ignore[operator]
    probe = probe_for(sink.address)
    for expected in (1, 2, 3):
        await probe()
        assert sink.connections == expected
        await wait_until(lambda: sink.open_connections == 0, timeout=1)


async def test_probe_speaks_ehlo_then_quit() -> None:
    commands: list[bytes] = []

    async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted.test ESMTP\r\n")
        while line := await reader.readline():
            commands.append(line.rstrip(b"\r\n"))
            if line.upper().startswith(b"EHLO"):
                writer.write(b"250-scripted.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif line.upper().startswith(b"QUIT"):
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"502 5.5.1 unexpected\r\n")

    async with raw_server(scripted) as address:
        await probe_for(address)()
    assert commands == [b"EHLO probe.test", b"QUIT"]


@pytest.mark.parametrize(
    ("greeting", "stage"),
    [
        (b"554 5.3.2 go away\r\n", "greeting"),
        (b"421 4.3.2 busy\r\n", "greeting"),
    ],
)
async def test_probe_fails_on_a_refusing_greeting(greeting: bytes, stage: str) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        await reader.read()

    async with raw_server(refuse) as address:
        with pytest.raises(UpstreamError) as caught:
            await probe_for(address)()
    assert caught.value.stage == stage


@pytest.mark.parametrize(
    "greeting",
    [b"", b"220 slow.test ESMTP\r\n"],  # silent from the start; greets, then ignores EHLO
    ids=["no-greeting", "no-ehlo-reply"],
)
async def test_probe_against_a_silent_server_fails_within_its_timeout(greeting: bytes) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await reader.read()  # never answer, until the client hangs up

    loop = asyncio.get_running_loop()
    async with raw_server(silent) as address:
        started = loop.time()
        with pytest.raises(UpstreamError):
            await probe_for(address, timeout_s=0.3)()
        assert 0.25 <= loop.time() - started < 0.6


async def test_silent_server_is_marked_down() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    changes = Changes()
    async with (
        raw_server(silent) as address,
        checking({"mute": probe_for(address, timeout_s=0.2)}, changes),
    ):
        await wait_until(lambda: bool(changes), timeout=2)
    assert changes == [("mute", False)]


class RecordingClock(SystemClock):
    """Real time, but records the intervals asked for and sleeps only briefly."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    ("interval_s", "down_interval_s"), [(10.0, 5.0), (1.0, 0.5), (0.3, 0.2), (0.1, 0.1)]
)
async def test_probes_more_often_while_down(interval_s: float, down_interval_s: float) -> None:
    outcomes = iter([None, None, "boom", "boom", "boom", None, None, None])

    async def scripted() -> None:
        failure = next(outcomes, None)
        if failure is not None:
            raise UpstreamError("x", "probe", failure)

    clock = RecordingClock()
    changes = Changes()
    checker = HealthChecker(
        {"x": scripted}, interval_s=interval_s, fall=2, rise=2, on_change=changes, clock=clock
    )
    assert clock.asked == []  # nothing probes before run()
    task = asyncio.create_task(checker.run())
    await wait_until(lambda: len(clock.asked) >= 8, timeout=2)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    up, down = interval_s, down_interval_s
    assert clock.asked[:8] == [up, up, up, down, down, down, up, up]
    assert changes == [("x", False), ("x", True)]
    assert changes.reasons[0] == "probes failed, last: probe: boom"


async def test_loop_survives_odd_probe_errors_and_a_failing_callback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def odd() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("not an UpstreamError\nat all")

    async def fine() -> None:
        pass

    def explode(name: str, healthy: bool, reason: str) -> None:
        raise ValueError("callback bug")

    checker = HealthChecker(
        {"odd": odd, "fine": fine},
        interval_s=1.0,
        fall=2,
        rise=2,
        on_change=explode,
        clock=RecordingClock(),
    )
    task = asyncio.create_task(checker.run())
    await wait_until(lambda: calls >= 5, timeout=2)
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert repr(checker).startswith("<HealthChecker odd=down(")
    assert repr(checker).endswith(" fine=up>")
    assert checker.healthy("fine") and not checker.healthy("odd")
    messages = [r.getMessage() for r in caplog.records]
    assert "upstream.health_callback_failed upstream=odd" in messages
    assert any(
        m.endswith("reason=probes failed, last: RuntimeError: not an UpstreamError at all")
        for m in messages
    )


async def test_run_with_no_upstreams_waits_until_cancelled() -> None:
    checker = HealthChecker(
        {}, interval_s=1.0, fall=1, rise=1, on_change=Changes(), clock=SystemClock()
    )
    assert repr(checker) == "<HealthChecker>"
    task = asyncio.create_task(checker.run())
    await asyncio.sleep(0.05)
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
