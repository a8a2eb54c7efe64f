"""Real HAProxy (the Debian package) running deploy/haproxy/haproxy.cfg as is, for tests.

The config takes its addresses from the environment; the listening socket is
created here and inherited (`fd@N`), so the port is known before HAProxy starts
and no other process can take it. State comes from the runtime API (`show stat`).
"""

from __future__ import annotations

import asyncio
import csv
import os
import shutil
import signal
import socket
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
BACKEND = "smtpbalancer"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )


class HAProxy:
    """`haproxy -db -f CONFIG` in front of two instances; stderr (its log) goes to a file."""

    def __init__(
        self,
        workdir: Path,
        instances: tuple[tuple[str, int], tuple[str, int]],
        *,
        source: str | None = None,
        bind_host: str = "127.0.0.1",
    ) -> None:
        binary = haproxy_binary()
        assert binary is not None, "haproxy is not installed"
        self.binary = binary
        self.workdir = workdir
        self.instances = instances
        self.source = source
        self.bind_host = bind_host
        self.runtime_socket = workdir / "haproxy.sock"
        self.log_path = workdir / "haproxy.log"
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    def environment(self, listener_fd: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            SMTPB_BIND=f"fd@{listener_fd}",
            SMTPB_INSTANCE_1="{}:{}".format(*self.instances[0]),
            SMTPB_INSTANCE_2="{}:{}".format(*self.instances[1]),
            SMTPB_RUNTIME_SOCKET=str(self.runtime_socket),
        )
        env.pop("SMTPB_HAPROXY_USER", None)
        if self.source is not None:
            env["SMTPB_SOURCE"] = self.source
        else:
            env.pop("SMTPB_SOURCE", None)
        return env

    async def start(self, timeout: float = 15.0) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.bind_host, 0))
            listener.listen(512)
            self.port = listener.getsockname()[1]
            fd = listener.fileno()
            with self.log_path.open("wb") as log:
                self.proc = await asyncio.create_subprocess_exec(
                    self.binary, "-db", "-f", str(CONFIG),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=self.environment(fd),
                    pass_fds=(fd,),
                )  # fmt: skip
        finally:
            listener.close()  # HAProxy holds its own copy
        async with asyncio.timeout(timeout):
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"haproxy exited {self.proc.returncode}:\n{self.log()}")
                try:
                    if len(await self.servers()) == 2:
                        return
                except OSError:
                    pass
                await asyncio.sleep(0.05)

    async def command(self, line: str) -> str:
        """One runtime API command; HAProxy answers and closes the connection."""
        reader, writer = await asyncio.open_unix_connection(str(self.runtime_socket))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            async with asyncio.timeout(5):
                return (await reader.read()).decode()
        finally:
            writer.close()

    async def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` rows of the smtpbalancer backend's servers, by server name."""
        text = await self.command("show stat")
        lines = text.lstrip("# ").splitlines()
        rows = csv.DictReader(line for line in lines if line)
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == BACKEND and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    async def servers(self) -> dict[str, str]:
        """Server name -> status ("UP", "DOWN", "UP 1/2", "DOWN 1/2", "MAINT", ...)."""
        return {name: row["status"] for name, row in (await self.stats()).items()}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
