"""Building configs, running the proxy in-process or as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from smtpbalancer import config
from smtpbalancer.config import Config

Upstreams = (
    list[tuple[str, tuple[str, int], int]] | list[tuple[str, tuple[str, int], int, dict[str, Any]]]
)


def config_mapping(
    spool_dir: Path, upstreams: Upstreams, **sections: dict[str, Any] | list[dict[str, Any]]
) -> dict[str, Any]:
    """A config as a TOML-shaped mapping: loopback, ephemeral ports, fast retries."""
    raw: dict[str, Any] = {
        "server": {
            "listen": "127.0.0.1:0",
            "hostname": "proxy.test",
            "drain_timeout": "5s",
            "workers": 1,  # one process unless a test is about workers
        },
        "spool": {"directory": str(spool_dir), "min_free_disk": 0},
        "delivery": {"retry_initial": "200ms", "retry_max": "1s", "timeout": "5s"},
        "metrics": {"listen": ""},
        "circuit_breaker": {"failure_threshold": 3, "open_for": "500ms"},
        "upstream": [
            {"name": up[0], "address": f"{up[1][0]}:{up[1][1]}", "weight": up[2], **extra}
            for up in upstreams
            for extra in [up[3] if len(up) > 3 else {}]  # type: ignore[misc]
        ],
    }
    for section, values in sections.items():
        if isinstance(values, list):  # arrays of tables, e.g. route=[{...}, ...]
            raw[section] = values
        else:
            raw.setdefault(section, {}).update(values)
    return raw


def make_config(
    spool_dir: Path, upstreams: Upstreams, **sections: dict[str, Any] | list[dict[str, Any]]
) -> Config:
    return config.from_mapping(config_mapping(spool_dir, upstreams, **sections))


def to_toml(raw: dict[str, Any]) -> str:
    """Just enough TOML writing for test configs (tables, arrays of tables, scalars)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []
    for section, body in raw.items():
        items = body if isinstance(body, list) else [body]
        for item in items:
            lines.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            lines.extend(f"{k} = {scalar(v)}" for k, v in item.items())
            lines.append("")
    return "\n".join(lines)


_READY = re.compile(r"smtpbalancer\.ready smtp=([\d.]+):(\d+)")


class ProxyProcess:
    """`smtpbalancer serve` as a real subprocess; stderr is collected for assertions."""

    def __init__(self, config_path: Path, preexec_fn: Any = None) -> None:
        self.config_path = config_path
        self.preexec_fn = preexec_fn
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.stderr_lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 15.0) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "smtpbalancer", "serve", "--config", str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=self.preexec_fn,
        )  # fmt: skip
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(ready))
        self.port = await asyncio.wait_for(ready, timeout)

    async def _read(self, ready: asyncio.Future[int]) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.stderr_lines.append(text)
            found = _READY.search(text)
            if found and not ready.done():
                ready.set_result(int(found.group(2)))
        if not ready.done():
            ready.set_exception(RuntimeError("proxy exited:\n" + "\n".join(self.stderr_lines)))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.wait()

    def log(self) -> str:
        return "\n".join(self.stderr_lines)
