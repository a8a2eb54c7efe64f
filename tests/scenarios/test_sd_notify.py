"""`smtpbalancer serve` under a Type=notify supervisor: READY, RELOADING/READY, STOPPING.

The test plays systemd: it binds a unix datagram socket, starts a real `serve`
subprocess with $NOTIFY_SOCKET pointing at it and reads what arrives, for one
process and for a supervisor with two workers (only the supervisor may notify:
the unit says NotifyAccess=main). READY=1 must come only once the SMTP listener
accepts (the process is frozen with SIGSTOP the moment READY=1 arrives and the
kernel must already complete a connection to the port it names), never when the
start fails; RELOADING=1 (with a CLOCK_MONOTONIC MONOTONIC_USEC) then READY=1
bracket a SIGHUP reload; SIGTERM sends STOPPING=1 and nothing follows it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.proxy import ProxyProcess, config_mapping, to_toml

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_factories=["asyncio"])]

_STATUS_PORT = re.compile(r"^STATUS=accepting mail on 127\.0\.0\.1:(\d+)\b", re.M)


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd; $NOTIFY_SOCKET names it for children."""
    path = tmp_path / "notify.sock"
    if len(str(path)) >= 100:  # sun_path is 108 bytes
        pytest.skip(f"tmp_path too long for a unix socket: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


async def next_datagram(sock: socket.socket, timeout: float = 15.0) -> str:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        return (await loop.sock_recv(sock, 4096)).decode()


def pending(sock: socket.socket) -> list[str]:
    out = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(sock.recv(4096).decode())
    return out


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def write_config(tmp_path: Path, relay: tuple[str, int], weight: int = 1, **server: object) -> Path:
    raw = config_mapping(tmp_path / "spool", [("relay", relay, weight)], server=dict(server))
    path = tmp_path / "proxy.toml"
    path.write_text(to_toml(raw))
    return path


WORKERS = [
    pytest.param(1, id="one-process"),
    pytest.param(2, id="supervisor-2-workers"),
]


async def start_and_check_ready(proc: ProxyProcess, notify_socket: socket.socket) -> None:
    """Start `proc`; READY=1 must name a port that already accepts when it arrives."""
    starting = asyncio.create_task(proc.start())
    try:
        ready = await next_datagram(notify_socket)
        assert proc.proc is not None
        proc.signal(signal.SIGSTOP)  # frozen: whatever it did after READY=1 cannot help now
        try:
            assert ready.splitlines()[0] == "READY=1", ready
            found = _STATUS_PORT.search(ready)
            assert found, ready
            port = int(found.group(1))
            # The kernel completes the handshake for a listening socket while the process
            # is stopped: this connects only if listen() happened before READY=1 was sent.
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        finally:
            proc.signal(signal.SIGCONT)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
        writer.close()
        await starting
        assert proc.port == port
    finally:
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await starting


@pytest.mark.parametrize("workers", WORKERS)
async def test_ready_once_the_listener_accepts_and_stopping_on_term(
    tmp_path: Path, sinks, notify_socket: socket.socket, workers: int
) -> None:
    relay = await sinks("relay")
    proc = ProxyProcess(write_config(tmp_path, relay.address, workers=workers))
    try:
        await start_and_check_ready(proc, notify_socket)
        assert pending(notify_socket) == []  # one READY=1 (workers never notify themselves)
        proc.signal(signal.SIGTERM)
        assert await next_datagram(notify_socket) == "STOPPING=1\nSTATUS=draining"
        assert await proc.wait() == 0
        assert pending(notify_socket) == []  # nothing after STOPPING (no late READY)
    finally:
        await proc.kill()


@pytest.mark.parametrize(
    "workers",
    [
        WORKERS[0],
        pytest.param(2, id="supervisor-2-workers"),
    ],
)
async def test_sighup_reload_is_bracketed_by_reloading_and_ready(
    tmp_path: Path, sinks, notify_socket: socket.socket, workers: int
) -> None:
    relay = await sinks("relay")
    proc = ProxyProcess(write_config(tmp_path, relay.address, workers=workers))
    try:
        await start_and_check_ready(proc, notify_socket)
        # A changed weight: RELOADING=1 + MONOTONIC_USEC (CLOCK_MONOTONIC, µs), then READY=1.
        write_config(tmp_path, relay.address, weight=3, workers=workers)
        before = monotonic_usec()
        proc.signal(signal.SIGHUP)
        reloading = await next_datagram(notify_socket, timeout=5)
        after = monotonic_usec()
        lines = reloading.splitlines()
        assert lines[0] == "RELOADING=1", reloading
        assert lines[1].startswith("MONOTONIC_USEC="), reloading
        assert before <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= after
        reloaded = await next_datagram(notify_socket)
        assert reloaded.splitlines()[0] == "READY=1", reloaded
        if workers == 1:
            assert reloaded == "READY=1\nSTATUS=reload generation=2 changed=upstream.relay.weight"
        proc.signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        await proc.kill()


async def test_no_ready_when_the_listener_cannot_bind(
    tmp_path: Path, sinks, notify_socket: socket.socket
) -> None:
    relay = await sinks("relay")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = ProxyProcess(write_config(tmp_path, relay.address, listen=f"127.0.0.1:{port}"))
        try:
            with pytest.raises(RuntimeError, match="proxy exited"):
                await proc.start()
            assert await proc.wait() == 1
        finally:
            await proc.kill()
    assert "smtpbalancer.start_failed" in proc.log()
    assert pending(notify_socket) == []
