"""The systems under test and the sinks, each a subprocess on 127.0.0.1.

Every process here is started with its own session (Ctrl-C in the terminal does
not reach it), remembered by PID and stopped by PID in `stop()`, which the suite
calls from `finally` blocks; nothing is ever killed by name. Postfix runs as a
private instance (its own config, queue and data directories under the run's work
directory, `postfix -c DIR start|stop`); the system's default instance is never
touched. Ports are picked free just before use (bind to port 0, close, reuse the
number).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/lib/postfix/sbin")


def which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + ":" + ":".join(SBIN_DIRS)
    return shutil.which(name, path=path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def smtp_ready(port: int, timeout: float = 2.0) -> bool:
    """One connection: 220 greeting, EHLO answered 250, QUIT."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            f = s.makefile("rb")

            def reply() -> bytes:
                line = f.readline()
                while line[3:4] == b"-":
                    line = f.readline()
                return line

            if not reply().startswith(b"220"):
                return False
            s.sendall(b"EHLO ready.bench.test\r\n")
            if not reply().startswith(b"250"):
                return False
            s.sendall(b"QUIT\r\n")
            reply()
            return True
    except OSError:
        return False


def wait_smtp(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Seconds until `port` answers EHLO with 250; raises if it does not within `timeout`."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if smtp_ready(port):
            return time.perf_counter() - t0
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before accepting")
        time.sleep(0.01)
    raise TimeoutError(f"127.0.0.1:{port} did not answer EHLO within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; by PID only."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


def scrape_metric(port: int, name: str) -> float | None:
    """`name` from smtpbalancer's /metrics on 127.0.0.1:`port`, summed over its labelled
    series (a supervisor's carry `worker`); None if absent. Raises OSError."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        total, found = 0.0, False
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        return total if found else None


def spawn(args: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, **kw,
        )  # fmt: skip


def tail(path: Path, size: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


_MESG = re.compile(rb"mesg=(\d+)")


class Sinks:
    """`count` SMTP sinks that count messages: Postfix's smtp-sink, or benchmarks/pysink.py."""

    def __init__(
        self, workdir: Path, count: int, kind: str, ports: list[int] | None = None
    ) -> None:
        self.workdir = workdir
        self.kind = kind
        self.ports = ports or [free_port() for _ in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outputs: list[Path] = []

    def start(self) -> Sinks:
        for i, port in enumerate(self.ports):
            out = self.workdir / f"sink-{port}-{i}.out"
            out.unlink(missing_ok=True)
            if self.kind == "smtp-sink":
                exe = which("smtp-sink")
                assert exe is not None
                user = ["-u", "nobody"] if os.geteuid() == 0 else []
                args = [exe, "-c", *user, "-m", "4000", f"127.0.0.1:{port}", "4096"]
            else:
                args = [sys.executable, str(HERE / "pysink.py"), f"127.0.0.1:{port}"]
            self.procs.append(spawn(args, out))
            self.outputs.append(out)
        for port, proc in zip(self.ports, self.procs, strict=True):
            wait_smtp(port, 15, proc)
        return self

    def count(self) -> int:
        total = 0
        for out in self.outputs:
            try:
                with open(out, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 160))
                    found = _MESG.findall(f.read())
            except OSError:
                found = []
            total += int(found[-1]) if found else 0
        return total

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc, 5)
        self.procs = []


class Target:
    """A path under test: where the client connects, which processes do the work."""

    name = "direct"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.client_ports: list[int] = []  # where the load generator connects

    def start(self, sinks: Sinks) -> None:
        # Direct: the client spreads its sessions over the same two sinks the relays use
        # (one smtp-sink process tops out at ~2,000 msg/s of 50 KiB here); smtp-source, with
        # one address only, uses the first.
        self.port = sinks.ports[0]
        self.client_ports = list(sinks.ports)

    @property
    def roots(self) -> list[int]:
        return []

    def queue_empty(self) -> bool:
        return True

    def stop(self) -> None:
        pass


class HAProxy(Target):
    name = "haproxy"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def version() -> str | None:
        exe = which("haproxy")
        if exe is None:
            return None
        out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"version (\S+)", out)
        return m.group(1) if m else "?"

    def start(self, sinks: Sinks) -> None:
        exe = which("haproxy")
        assert exe is not None
        self.port = free_port()
        servers = "".join(f"    server s{i} 127.0.0.1:{p}\n" for i, p in enumerate(sinks.ports))
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(
            "global\n    maxconn 4000\n\n"
            "defaults\n    mode tcp\n    timeout connect 5s\n"
            "    timeout client 120s\n    timeout server 120s\n\n"
            f"frontend smtp\n    bind 127.0.0.1:{self.port}\n    default_backend sinks\n\n"
            f"backend sinks\n    balance roundrobin\n{servers}"
        )
        log = self.workdir / "haproxy.log"
        self.proc = spawn([exe, "-db", "-f", str(cfg)], log)
        try:
            wait_smtp(self.port, 15, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"haproxy did not start: {exc}\n{tail(log)}") from exc

    @property
    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# Relay everything to one sink; durable queue as shipped (Postfix fsyncs each queue file
# before its 250); no local delivery; limits sized so nothing throttles the test.
POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink_port}
mynetworks = 127.0.0.0/8
inet_interfaces = loopback-only
inet_protocols = ipv4
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
default_process_limit = {process_limit}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
in_flow_delay = 0s
default_destination_concurrency_limit = 20
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
maillog_file = {maillog}
maillog_file_prefixes = {root}
"""


class Postfix(Target):
    """A private Postfix instance relaying to the first sink; root only."""

    name = "postfix"
    QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(self, workdir: Path, sessions: int = 100) -> None:
        super().__init__(workdir)
        self.root = workdir / "postfix"
        self.etc = self.root / "etc"
        self.queue = self.root / "queue"
        self.master_pid: int | None = None
        self.process_limit = max(300, 2 * sessions + 100)
        self._started = False

    @staticmethod
    def unavailable() -> str | None:
        """Why this machine cannot run the Postfix path, or None."""
        if which("postfix") is None:
            return "postfix is not installed"
        if os.geteuid() != 0:
            return "a Postfix instance needs root (its master runs as root)"
        try:
            import pwd

            pwd.getpwnam("postfix")
        except KeyError:
            return "no 'postfix' user"
        return None

    @staticmethod
    def version() -> str | None:
        exe = which("postconf")
        if exe is None:
            return None
        out = subprocess.run(
            [exe, "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "?"

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        exe = which("postfix")
        assert exe is not None
        return subprocess.run(
            [exe, "-c", str(self.etc), *args],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self, sinks: Sinks) -> None:
        import pwd

        self.port = free_port()
        if self.root.exists():
            shutil.rmtree(self.root)
        for d in (self.etc, self.queue, self.root / "data"):
            d.mkdir(parents=True)
        # The postfix user must be able to reach its queue and data directories (the work
        # directory is made by mkdtemp, mode 0700).
        for d in (self.workdir, self.root, self.queue):
            d.chmod(d.stat().st_mode | 0o755)
        pw = pwd.getpwnam("postfix")
        os.chown(self.root / "data", pw.pw_uid, pw.pw_gid)
        maillog = self.root / "maillog"
        (self.etc / "main.cf").write_text(
            POSTFIX_MAIN_CF.format(
                queue=self.queue, data=self.root / "data", sink_port=sinks.ports[0],
                process_limit=self.process_limit, maillog=maillog, root=self.root,
            )
        )  # fmt: skip
        (self.etc / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=self.port))
        res = self._postfix("start")
        self._started = True
        if res.returncode != 0:
            raise RuntimeError(
                f"postfix -c {self.etc} start failed ({res.returncode}): "
                f"{res.stdout}{res.stderr}\n{tail(maillog)}\n"
                f"(run `postfix -c {self.etc} check` in a terminal to see why)"
            )
        pidfile = self.queue / "pid" / "master.pid"
        t0 = time.perf_counter()
        while not pidfile.exists() and time.perf_counter() - t0 < 15:
            time.sleep(0.05)
        self.master_pid = int(pidfile.read_text().split()[0])
        wait_smtp(self.port, 30)

    @property
    def roots(self) -> list[int]:
        return [self.master_pid] if self.master_pid else []

    def queue_size(self) -> int:
        n = 0
        for q in self.QUEUES:
            for _dirpath, _dirs, files in os.walk(self.queue / q):
                n += len(files)
        return n

    def queue_empty(self) -> bool:
        return self.queue_size() == 0

    def stop(self) -> None:
        if not self._started:
            return
        from procstat import tree

        members = tree(self.roots) if self.master_pid else []
        # What `postfix stop` does (SIGTERM to the master, which stops its children), without
        # its one-second polling; `postfix stop` itself only when the pid is unknown.
        if self.master_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.master_pid, signal.SIGTERM)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._postfix("stop", timeout=60)
        t0 = time.perf_counter()
        while self.master_pid and _alive(self.master_pid):
            if time.perf_counter() - t0 > 20:
                for pid in members:  # by PID: the instance's own processes only
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        self._started = False
        self.master_pid = None


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (the Postfix master is reaped by init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(raw: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, body in raw.items():
        for item in body if isinstance(body, list) else [body]:
            lines.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
            lines.append("")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'server.workers=2' -> ('server', 'workers', 2)."""
    key, eq, value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not eq or not dot:
        raise ValueError(f"--set {text!r}: expected SECTION.KEY=VALUE")
    v: Any = value.strip()
    if v in ("true", "false"):
        v = v == "true"
    elif re.fullmatch(r"-?\d+", v):
        v = int(v)
    elif re.fullmatch(r"-?\d+\.\d*", v):
        v = float(v)
    else:
        v = v.strip('"')
    return section, name, v


def serve_env(code: Path | None) -> dict[str, str]:
    """The environment for `python -m smtpbalancer`: with `code`, that copy of the package
    comes first on sys.path (before the editable install's .pth entry). `-m` puts the
    current directory before PYTHONPATH, so run it from a directory without the package."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p
        )
    return env


class Smtpbalancer(Target):
    """`smtpbalancer serve` with a generated config: two upstream sinks, its own spool."""

    name = "smtpbalancer"

    def __init__(
        self,
        workdir: Path,
        overrides: list[str] | None = None,
        spool: Path | None = None,
        code: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        self.overrides = overrides or []
        self.code = code  # a directory holding a copy of the smtpbalancer package, or None
        self.spool = spool or workdir / "smtpbalancer-spool"
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.config_path = workdir / "smtpbalancer.toml"
        self.log = workdir / "smtpbalancer.log"
        self.ready_s = 0.0

    def config(self, sink_ports: list[int]) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "server": {
                "listen": f"127.0.0.1:{self.port}",
                "hostname": "smtpbalancer.bench",
                "max_connections": 20000,
                "max_connections_per_client": 20000,
            },
            "spool": {"directory": str(self.spool), "min_free_disk": 0, "max_size": "100GB"},
            "delivery": {"retry_initial": "1s", "retry_max": "5s"},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "upstream": [
                {"name": f"sink{i}", "address": f"127.0.0.1:{p}", "tls": "none"}
                for i, p in enumerate(sink_ports)
            ],
        }
        for text in self.overrides:
            section, name, value = parse_override(text)
            raw.setdefault(section, {})[name] = value
        return raw

    def start(self, sinks: Sinks, timeout: float = 60) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.config_path.write_text(to_toml(self.config(sinks.ports)))
        self.restart(timeout)
        self.wait_metrics(timeout)

    def wait_metrics(self, timeout: float = 60) -> float:
        """Seconds until /metrics answers with the queue gauge (the admin listener may come
        up after the SMTP listener, e.g. a supervisor's once all its workers reported)."""
        t0 = time.perf_counter()
        while self.queue_messages() is None:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"no /metrics on port {self.metrics_port}\n{tail(self.log)}")
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"smtpbalancer exited\n{tail(self.log)}")
            time.sleep(0.02)
        return time.perf_counter() - t0

    def restart(self, timeout: float = 60) -> float:
        """Exec `serve` (same ports, same spool); seconds from exec to EHLO answered 250."""
        args = [sys.executable, "-m", "smtpbalancer", "serve", "--config", str(self.config_path)]
        t0 = time.perf_counter()
        self.proc = spawn(args, self.log, env=serve_env(self.code), cwd=self.workdir)
        try:
            wait_smtp(self.port, timeout, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"smtpbalancer did not start: {exc}\n{tail(self.log)}") from exc
        self.ready_s = time.perf_counter() - t0
        return self.ready_s

    @property
    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def metric(self, name: str) -> float | None:
        try:
            return scrape_metric(self.metrics_port, name)
        except OSError:
            return None

    def queue_messages(self) -> float | None:
        return self.metric("smtpbalancer_queue_messages")

    def queue_empty(self) -> bool:
        return self.queue_messages() == 0

    def stop(self, grace: float = 60) -> None:
        stop_process(self.proc, grace)
        self.proc = None
