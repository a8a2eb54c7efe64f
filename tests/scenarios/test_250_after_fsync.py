"""Invariant 1, observed from outside: each 250 is written after its fsyncs.

The proxy runs under strace (-f: every thread; -y: file descriptors shown with
their paths). For every queue id the client was told about, the trace must
show, in completion order: fsync of the message's temp file, its rename into
queue/, an fsync of the queue/ directory, and only then the "250 ... queued as"
write to the client socket (REFERENCE D8).
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


async def test_each_250_follows_file_fsync_rename_and_directory_fsync(
    tmp_path: Path, sinks
) -> None:
    relay = await sinks("relay")
    spool = tmp_path / "spool"
    cfg_path = tmp_path / "proxy.toml"
    cfg_path.write_text(to_toml(config_mapping(spool, [("relay", relay.address, 1)])))
    trace_path = tmp_path / "trace.txt"
    syscalls = "openat,fsync,fdatasync,rename,renameat,renameat2,write,writev,sendto,sendmsg"
    queue_ids = []
    async with proxy_under_strace(
        cfg_path, "-y", "-s", "120", "-o", str(trace_path), "-e", f"trace={syscalls}"
    ) as port:
        for _ in range(5):
            _, body = make_message()
            _, reply = await send_mail(port, body)
            queue_ids.append(reply.rsplit(" ", 1)[1])

    lines = completions(trace_path.read_text())
    queue_dir = str(spool / "queue")
    fsyncs = ("fsync(", "fdatasync(")
    for qid in queue_ids:
        fsync_file = first(lines, 0, fsyncs, f"/.tmp-{qid}>")
        renamed = first(lines, 0, ("rename",), f'{queue_dir}/{qid}"')
        fsync_dir = first(lines, renamed, ("fsync(",), f"<{queue_dir}>)")
        said_250 = first(lines, 0, ("write", "send"), f"queued as {qid}")
        assert fsync_file < renamed < fsync_dir < said_250, (qid, fsync_file, renamed, fsync_dir)


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
    assert list((tmp_path / "spool" / "queue").iterdir()) == []
