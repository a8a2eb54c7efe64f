"""Invariant 1, observed from outside: each 250 is written after its fsyncs.

The proxy runs under strace (-f: every thread; -y: file descriptors shown with
their paths). For every queue id the client was told about, the trace must
show, in completion order: fsync of the message's temp file, its rename into
queue/, an fsync of the queue/ directory, and only then the "250 ... queued as"
write to the client socket (REFERENCE D8).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path

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
            pending[pid] = text[: -len("<unfinished ...>")]
        elif text.startswith("<... "):
            done.append(pending.pop(pid, "") + text.split("resumed>", 1)[-1])
        else:
            done.append(text)
    return done


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
    proc = await asyncio.create_subprocess_exec(
        "strace", "-f", "-y", "-s", "120", "-o", str(trace_path), "-e", f"trace={syscalls}",
        sys.executable, "-m", "smtpbalancer", "serve", "--config", str(cfg_path),
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        port = proxy_pid = 0
        while not port:
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, "proxy exited early"
            if found := re.search(r"smtpbalancer\.ready smtp=[\d.]+:(\d+) .* pid=(\d+)", line):
                port, proxy_pid = int(found.group(1)), int(found.group(2))
        queue_ids = []
        for _ in range(5):
            _, body = make_message()
            _, reply = await send_mail(port, body)
            queue_ids.append(reply.rsplit(" ", 1)[1])
    finally:
        if proxy_pid:
            os.kill(proxy_pid, signal.SIGTERM)  # the proxy, not strace (which would detach)
        else:
            proc.kill()
        await asyncio.wait_for(proc.communicate(), 20)

    lines = completions(trace_path.read_text())
    queue_dir = str(spool / "queue")
    fsyncs = ("fsync(", "fdatasync(")
    for qid in queue_ids:
        fsync_file = first(lines, 0, fsyncs, f"/.tmp-{qid}>")
        renamed = first(lines, 0, ("rename",), f'{queue_dir}/{qid}"')
        fsync_dir = first(lines, renamed, ("fsync(",), f"<{queue_dir}>)")
        said_250 = first(lines, 0, ("write", "send"), f"queued as {qid}")
        assert fsync_file < renamed < fsync_dir < said_250, (qid, fsync_file, renamed, fsync_dir)
