"""`[server] workers = N`: N relay processes share the SMTP port, one spool shard each.

One Python process relays on one core. With `workers > 1`, `smtpbalancer serve`
becomes a supervisor: it starts N copies of itself (`serve` with SMTPBALANCER_WORKER
set), each a complete relay with its own spool shard, event loop, upstream pools and
admin listener on an ephemeral loopback port. The workers bind the SMTP port with
SO_REUSEPORT, so the kernel spreads connections over them; nothing is shared between
them but the port, which keeps "250 means durable" a per-process matter.

Per-worker shares of what the config states for the whole instance: each worker gets
1/N of every upstream's `rate` and `daily_quota`, ceil(1/N) of its `max_connections`
and of `server.max_connections`, and 1/N of `spool.max_size`. Per-client limits
(`max_connections_per_client`, AUTH failure budgets) are enforced per worker.

Spool shards: worker 0 uses `spool.directory` itself, worker i > 0 uses
`spool.directory/worker-i`, so going from one worker to N keeps the existing spool as
shard 0. A shard left over after lowering N is refused at start (nothing is ever
stranded silently): raise N again, or drain it with `smtpbalancer queue`.

The supervisor serves the admin listener (`[metrics] listen`): /metrics merges the
workers' metrics with a `worker` label (sum over it for counters and queue gauges,
max for `upstream_healthy`), /status and /readyz combine theirs, operations go to
every worker. SIGHUP and SIGTERM are passed on; a worker that dies is restarted on
its shard (its spool is recovered as after any crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from smtpbalancer import admin_client, sdnotify
from smtpbalancer.admin import AdminServer, FanOutApp
from smtpbalancer.admin_client import AdminUnavailable
from smtpbalancer.clock import SystemClock
from smtpbalancer.config import Config, MetricsConfig
from smtpbalancer.tasks import spawn

log = logging.getLogger(__name__)

ENV: Final = "SMTPBALANCER_WORKER"  # "INDEX/COUNT/SMTP_PORT/TLS_PORT/REPORT_FD"
START_TIMEOUT_S: Final = 120.0  # recovery of a large shard happens before a worker reports
RESTART_BACKOFF_S: Final = (1.0, 2.0, 5.0, 10.0, 30.0)
STOP_TIMEOUT_S: Final = 120.0
PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What a worker process is told by its supervisor."""

    index: int
    count: int
    smtp_port: int
    tls_port: int  # 0 when there is no implicit-TLS listener
    report_fd: int  # the worker writes its admin port here once it accepts mail

    def encode(self) -> str:
        return f"{self.index}/{self.count}/{self.smtp_port}/{self.tls_port}/{self.report_fd}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerRole | None:
        raw = (os.environ if environ is None else environ).get(ENV)
        if not raw:
            return None
        index, count, smtp, tls, fd = (int(part) for part in raw.split("/"))
        return cls(index, count, smtp, tls, fd)


def shard_directory(spool: Path, index: int) -> Path:
    return spool if index == 0 else spool / f"worker-{index}"


def stranded_shards(spool: Path, count: int) -> list[Path]:
    """Shards of workers beyond `count` that still hold a spool (a lowered `workers`)."""
    if not spool.is_dir():
        return []
    found = []
    for child in spool.iterdir():
        index = child.name.removeprefix("worker-")
        beyond = child.name.startswith("worker-") and index.isdigit() and int(index) >= count
        if beyond and any(p.is_file() and p.name != "lock" for p in child.rglob("*")):
            found.append(child)
    return sorted(found)


def refuse_stranded(cfg: Config) -> bool:
    """Log and return True when lowering `workers` would leave a shard's mail undelivered."""
    stranded = stranded_shards(cfg.spool.directory, cfg.server.workers)
    if stranded:
        log.error(
            "workers.stranded_shards shards=%s workers=%d action=refuse_start "
            "hint='set server.workers back to at least %d until they are empty'",
            ",".join(str(p) for p in stranded),
            cfg.server.workers,
            int(stranded[-1].name.removeprefix("worker-")) + 1,
        )
    return bool(stranded)


def worker_config(cfg: Config, role: WorkerRole) -> Config:
    """The config one worker runs: its shard, its port, its share of every limit."""
    n = role.count

    def share(value: int) -> int:
        return max(1, math.ceil(value / n))

    upstreams = tuple(
        dataclasses.replace(
            u,
            max_connections=share(u.max_connections),
            rate_per_s=None if u.rate_per_s is None else u.rate_per_s / n,
            daily_quota=None if u.daily_quota is None else share(u.daily_quota),
        )
        for u in cfg.upstreams
    )
    server = dataclasses.replace(
        cfg.server,
        port=role.smtp_port,
        max_connections=share(cfg.server.max_connections),
        tls_listen=None
        if cfg.server.tls_listen is None
        else (cfg.server.tls_listen[0], role.tls_port),
    )
    spool = dataclasses.replace(
        cfg.spool,
        directory=shard_directory(cfg.spool.directory, role.index),
        max_size_bytes=max(1, cfg.spool.max_size_bytes // n),
    )
    metrics = dataclasses.replace(cfg.metrics, host="127.0.0.1", port=0)
    return dataclasses.replace(
        cfg, server=server, spool=spool, metrics=metrics, upstreams=upstreams
    )


def report_ready(role: WorkerRole, admin_port: int) -> None:
    """Tell the supervisor this worker accepts mail and where its admin listener is."""
    with contextlib.suppress(OSError):
        os.write(role.report_fd, f"{admin_port}\n".encode())
        os.close(role.report_fd)


def _reserve(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket: resolves port 0 for every worker to share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Worker:
    """One worker process as its supervisor sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.admin_port = 0
        self.restarts = 0

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.admin_port}" if self.admin_port else None


class Supervisor:
    def __init__(self, cfg: Config, config_path: Path, argv_options: list[str]) -> None:
        self.cfg = cfg
        self.path = config_path
        self.count = cfg.server.workers
        self.workers = [Worker(i) for i in range(self.count)]
        self._options = argv_options  # --log-format etc., passed on to every worker
        self._reserved: list[socket.socket] = []
        self._smtp_port = cfg.server.port
        self._tls_port = 0
        self._stopping = False
        self._admin: AdminServer | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._reloading = asyncio.Lock()

    async def run(self) -> int:
        self._resolve_ports()
        try:
            started = await asyncio.gather(*(self._start(w) for w in self.workers))
        finally:
            for sock in self._reserved:
                sock.close()  # every worker listens now (or failed): the port stays theirs
        if not all(started):
            await self._stop_all()
            return 1
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()

        def stop() -> None:
            self._stopping = True
            stopped.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        self._start_admin()
        self._watchers = [spawn(self._watch(w), name=f"worker-{w.index}") for w in self.workers]
        log.info(
            "smtpbalancer.ready smtp=%s:%d workers=%d metrics=%s pid=%d",
            self.cfg.server.host,
            self._smtp_port,
            self.count,
            f"{self.cfg.metrics.host}:{self._admin.address[1]}" if self._admin else "off",
            os.getpid(),
        )
        sdnotify.notify(
            f"READY=1\nSTATUS=accepting mail on {self.cfg.server.host}:{self._smtp_port}"
            f" with {self.count} workers"
        )
        await stopped.wait()
        sdnotify.notify("STOPPING=1\nSTATUS=draining")
        for task in self._watchers:
            task.cancel()
        await self._stop_all()
        if self._admin is not None:
            await asyncio.to_thread(self._admin.stop)
        log.info("smtpbalancer.stopped workers=%d", self.count)
        return 0

    def _resolve_ports(self) -> None:
        server = self.cfg.server
        sock = _reserve(server.host, server.port)
        self._reserved.append(sock)
        self._smtp_port = sock.getsockname()[1]
        if server.tls_listen is not None:
            tls_sock = _reserve(*server.tls_listen)
            self._reserved.append(tls_sock)
            self._tls_port = tls_sock.getsockname()[1]

    async def _start(self, worker: Worker) -> bool:
        read_fd, write_fd = os.pipe()
        role = WorkerRole(worker.index, self.count, self._smtp_port, self._tls_port, write_fd)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # only we notify
        env[ENV] = role.encode()
        command = [sys.executable, "-m", "smtpbalancer", *self._options]
        command += ["serve", "--config", str(self.path)]
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                pass_fds=(write_fd,),
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        finally:
            os.close(write_fd)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(_read_line, read_fd), START_TIMEOUT_S)
        except TimeoutError:
            line = ""
        finally:
            os.close(read_fd)
        if not line.strip().isdigit():
            log.error("workers.start_failed worker=%d pid=%s", worker.index, worker.process.pid)
            return False
        worker.admin_port = int(line)
        log.info(
            "workers.started worker=%d pid=%d admin_port=%d",
            worker.index,
            worker.process.pid,
            worker.admin_port,
        )
        return True

    async def _watch(self, worker: Worker) -> None:
        """Restart a worker that died on its own (a crash, kill -9), with backoff."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping:
                return
            worker.admin_port = 0
            delay = RESTART_BACKOFF_S[min(worker.restarts, len(RESTART_BACKOFF_S) - 1)]
            log.error(
                "workers.died worker=%d pid=%d exit=%d restart_in=%.0fs",
                worker.index,
                worker.process.pid,
                code,
                delay,
            )
            await asyncio.sleep(delay)
            worker.restarts += 1
            if await self._start(worker):
                worker.restarts = 0

    def _reload(self) -> None:
        spawn(self._reload_all(), name="workers-reload")

    async def _reload_all(self) -> None:
        """SIGHUP: every worker re-reads the file; systemd hears RELOADING=1 … READY=1."""
        async with self._reloading:
            sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={int(SystemClock().monotonic() * 1e6)}")
            outcomes: list[str] = []
            for worker in self.workers:
                outcomes.append(f"worker {worker.index}: {await self._reload_one(worker)}")
            log.info("workers.reload %s", "; ".join(outcomes))
            sdnotify.notify(f"READY=1\nSTATUS={sdnotify.status_line('; '.join(outcomes))}")

    async def _reload_one(self, worker: Worker) -> str:
        """Through the worker's admin listener (we learn the outcome), else by its SIGHUP."""
        if worker.admin_port:
            admin = MetricsConfig(port=worker.admin_port, admin_token=self.cfg.metrics.admin_token)
            with contextlib.suppress(AdminUnavailable):
                _, doc = await asyncio.to_thread(admin_client.post, admin, "/reload")
                return str(doc.get("reload", doc))
        if worker.process is not None and worker.process.returncode is None:
            worker.process.send_signal(signal.SIGHUP)
            return "signalled"
        return "not running"

    async def _stop_all(self) -> None:
        running = [
            w.process
            for w in self.workers
            if w.process is not None and w.process.returncode is None
        ]
        for process in running:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), STOP_TIMEOUT_S)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    def _start_admin(self) -> None:
        metrics = self.cfg.metrics
        if not metrics.enabled:
            return
        self._admin = AdminServer(
            FanOutApp(
                lambda: {str(w.index): w.url for w in self.workers},
                token=metrics.admin_token,
            ),
            metrics.host,
            metrics.port,
        )
        self._admin.start()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM (a graceful drain) if the supervisor dies, even by -9."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _read_line(fd: int) -> str:
    """Blocking read of one line (the worker's report), '' at EOF: the worker died first."""
    chunks = b""
    while not chunks.endswith(b"\n"):
        data = os.read(fd, 64)
        if not data:
            break
        chunks += data
    return chunks.decode(errors="replace")
