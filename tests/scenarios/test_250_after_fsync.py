"""Invariant 1, observed from outside: each 250 is written after its fdatasync.

The proxy runs under strace (-f: every thread; -y: file descriptors shown with
their paths). For every queue id the client was told about, the trace must
show, in completion order: the write into a segment file (segments/<seq>.log)
that carries the record with that id, an fdatasync of that same segment file,
and only then the "250 ... queued as" write to the client socket. The segment
file's creation is followed by an fsync of the segments/ directory before the
first 250 for anything in it (REFERENCE D8).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
from support.mail import make_message, send_mail
from support.proxy import config_mapping, to_toml

from smtpbalancer.clock import SystemClock
from smtpbalancer.spool import recovery
from smtpbalancer.spool.store import SpoolStore

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="strace not installed (CI installs it)"
)

_LINE = re.compile(r"^(\d+)\s+(.*)$")


def completions(trace: str) -> list[str]:
    """Syscall lines in the order they completed (joins strace's unfinished/resumed pairs)."""
    pending: dict[str, str] = {}
    done: list[str] = []
    for raw in trace.splitlines():
        found = _LINE.match(raw)
        if not found:
            continue
        pid, text = found.groups()
        if text.endswith("<unfinished ...>"):
            pending[pid] = text[: -len("<unfinished ...>")].rstrip()  # "fsync(7</q> " + ") = 0"
        elif text.startswith("<... "):
            done.append(pending.pop(pid, "") + text.split("resumed>", 1)[-1])
        else:
            done.append(text)
    return done


@contextlib.asynccontextmanager
async def proxy_under_strace(cfg_path: Path, *strace_args: str) -> AsyncIterator[int]:
    """`smtpbalancer serve` under strace; yields the SMTP port; SIGTERMs the proxy itself
    (signalling strace would only make it detach)."""
    proc = await asyncio.create_subprocess_exec(
        "strace", "-f", *strace_args,
        sys.executable, "-m", "smtpbalancer", "serve", "--config", str(cfg_path),
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    proxy_pid = 0
    try:
        assert proc.stderr is not None
        port = 0
        while not port:
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, "proxy exited early"
            if found := re.search(r"smtpbalancer\.ready smtp=[\d.]+:(\d+) .* pid=(\d+)", line):
                port, proxy_pid = int(found.group(1)), int(found.group(2))
        yield port
    finally:
        if proxy_pid:
            os.kill(proxy_pid, signal.SIGTERM)
        else:
            proc.kill()
        await asyncio.wait_for(proc.communicate(), 20)


def first(lines: list[str], start: int, prefixes: tuple[str, ...], needle: str) -> int:
    """Index of the first line from `start` that begins with a prefix and contains needle."""
    for i in range(start, len(lines)):
        if lines[i].startswith(prefixes) and needle in lines[i]:
            return i
    raise AssertionError(f"{prefixes} ... {needle!r} not in the trace")


_FD = re.compile(r"^\w+\((\d+<[^>]*>)")


async def test_each_250_follows_the_segment_write_and_its_fdatasync(tmp_path: Path, sinks) -> None:
    relay = await sinks("relay")
    spool = tmp_path / "spool"
    cfg_path = tmp_path / "proxy.toml"
    cfg_path.write_text(to_toml(config_mapping(spool, [("relay", relay.address, 1)])))
    trace_path = tmp_path / "trace.txt"
    syscalls = "openat,fsync,fdatasync,write,writev,pwrite64,pwritev,pwritev2,sendto,sendmsg"
    queue_ids = []
    async with proxy_under_strace(
        cfg_path, "-y", "-s", "120", "-o", str(trace_path), "-e", f"trace={syscalls}"
    ) as port:
        for _ in range(5):
            _, body = make_message()
            _, reply = await send_mail(port, body)
            queue_ids.append(reply.rsplit(" ", 1)[1])

    lines = completions(trace_path.read_text())
    segments = str(spool / "segments")
    writes = ("pwritev(", "pwritev2(", "pwrite64(", "writev(", "write(")
    for qid in queue_ids:
        wrote = first(lines, 0, writes, qid)
        fd = _FD.match(lines[wrote])
        assert fd is not None and fd.group(1).endswith(".log>"), lines[wrote]
        assert f"<{segments}/" in fd.group(1), lines[wrote]
        assert not lines[wrote].rstrip().endswith(tuple(f"= -1 {e}" for e in ("EIO", "ENOSPC")))
        synced = first(lines, wrote + 1, ("fdatasync(",), f"({fd.group(1)})")
        said_250 = first(lines, 0, ("write", "send"), f"queued as {qid}")
        assert wrote < synced < said_250, (qid, wrote, synced, said_250)
        path = fd.group(1).split("<", 1)[1].rstrip(">")
        created = first(lines, 0, ("openat(",), f'"{path}", O_WRONLY|O_CREAT|O_EXCL')
        dir_synced = first(lines, created, ("fsync(",), f"<{segments}>)")
        assert created < dir_synced < said_250, (qid, created, dir_synced, said_250)


async def test_when_fsync_fails_every_message_gets_451_and_nothing_is_relayed(
    tmp_path: Path, sinks
) -> None:
    """REFERENCE D3: fsync returns EIO (injected by strace) -> 451 4.3.0, never 250."""
    relay = await sinks("relay")
    cfg_path = tmp_path / "proxy.toml"
    cfg_path.write_text(to_toml(config_mapping(tmp_path / "spool", [("relay", relay.address, 1)])))
    inject = ("-o", "/dev/null", "-e", "inject=fsync,fdatasync:error=EIO")
    async with proxy_under_strace(cfg_path, *inject) as port:
        for _ in range(3):
            _, body = make_message()
            with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                await send_mail(port, body)
            assert (refused.value.code, refused.value.message[:5]) == (451, "4.3.0")
    assert relay.messages == 0
    # Nothing that got a 451 is left to deliver: no segment survived (none was ever
    # acknowledged) and a restart finds nothing.
    assert list((tmp_path / "spool" / "segments").iterdir()) == []
    store = SpoolStore(tmp_path / "spool", SystemClock())
    store.open()
    assert recovery.scan(store).messages == []
    store.close()
