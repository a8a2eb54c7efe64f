"""Scale-out through HAProxy: the same load into 1 and into 2 instances, in one run.

Real processes on 127.0.0.1: two minimal relays (this script with `--sink`: 250 to
everything, much cheaper than `smtpbalancer sink`, so the cores go to the instances),
one or two `smtpbalancer serve` instances (workers = 1 each, PROXY protocol on, own spool),
HAProxy running deploy/haproxy/haproxy.cfg as is, and a load generator in its own
process (raw SMTP over asyncio streams, reused connections, one command at a time).
For "1 instance" both of HAProxy's server lines point at the same instance, so
HAProxy's work per message is the same in every row. A "direct" row (the load
straight into one instance) shows what the balancer costs.

Reported per row: accepted msg/s (250s through HAProxy), end to end msg/s (until
every instance's queue is empty), each rate as a ratio of the "1 instance" row
measured in the same run, CPU per message of each part (instances, HAProxy, sinks,
load generator) and how many cores the whole machine was busy during the load (and
how many of those were this benchmark's). Rows are interleaved over `--rounds` and
the median is printed: absolute numbers drift on a shared machine, ratios measured
together do not. On a 2-core machine the generator, the sinks and
HAProxy compete with the instances for the same cores: read the ratio as what a
second instance adds on *this* box, not as a limit of the design.
Usage: python benchmarks/haproxy_scaleout.py [--n 4000] [--clients 16] [--size 1024]
       [--rounds 3] [--spool-parent DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from peers import free_port, scrape_metric  # sibling modules: run as benchmarks/<script>.py
from procstat import own_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
SMTPB = [sys.executable, "-m", "smtpbalancer"]


def busy_cores() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args} did not listen on {port}")


def metric(port: int, name: str) -> float:
    return scrape_metric(port, name) or 0.0


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- a minimal relay (`--sink PORT`): 250 to everything, so the sinks cost little CPU -----


async def _sink_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 sink.bench ESMTP\r\n")
    serial = 0
    try:
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                serial += 1
                writer.write(b"250 2.0.0 Ok: queued as S%d\r\n" % serial)
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            else:  # EHLO/HELO, MAIL, RCPT, RSET, NOOP
                writer.write(b"250 sink.bench\r\n" if verb in (b"EHLO", b"HELO") else b"250 OK\r\n")
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _sink(port: int) -> None:
    server = await asyncio.start_server(_sink_session, "127.0.0.1", port, limit=64 * 1024 * 1024)
    async with server:
        await server.serve_forever()


# --- the load generator (runs in its own process: `--generate PORT N CLIENTS SIZE`) ------


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def _session(port: int, todo: list[int], body: bytes, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await _reply(reader)).startswith(b"220"), "greeting"
        writer.write(b"EHLO bench.test\r\n")
        await _reply(reader)
        while todo:
            todo.pop()
            for line in (b"MAIL FROM:<bench@sender.test>", b"RCPT TO:<r@rcpt.test>", b"DATA"):
                writer.write(line + b"\r\n")
                await _reply(reader)
            writer.write(body)
            final = await _reply(reader)
            counts[0 if final.startswith(b"250") else 1] += 1
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()


async def _generate(port: int, n: int, clients: int, size: int) -> None:
    line = b"x" * 74 + b"\r\n"
    body = b"Subject: bench\r\n\r\n" + line * max(1, (size - 20) // len(line)) + b".\r\n"
    todo = list(range(n))
    counts = [0, 0]
    start = time.perf_counter()
    await asyncio.gather(*(_session(port, todo, body, counts) for _ in range(clients)))
    print(json.dumps({"seconds": time.perf_counter() - start, "ok": counts[0], "bad": counts[1]}))


def generate(port: int, n: int, clients: int, size: int) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, __file__, "--generate", str(port), str(n), str(clients), str(size)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    if result["bad"]:
        raise RuntimeError(f"{result['bad']} messages were not accepted")
    return float(result["seconds"]), int(result["ok"])


# --- the setup ----------------------------------------------------------------------


@dataclass
class Instance:
    smtp: int
    metrics: int
    proc: subprocess.Popen[bytes]


@dataclass
class Bench:
    work: Path
    sinks: list[int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    sink_pids: list[int] = field(default_factory=list)
    haproxy_pid: int = 0
    serial: int = 0

    def spawn(
        self, args: list[str], name: str, **kw: object
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=out, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc, log

    def instance(self, *, proxy: bool = True) -> Instance:
        self.serial += 1
        smtp, metrics = free_port(), free_port()
        ups = "".join(
            f'[[upstream]]\nname = "sink{i}"\naddress = "127.0.0.1:{p}"\ntls = "none"\n\n'
            for i, p in enumerate(self.sinks)
        )
        cfg = self.work / f"instance-{self.serial}.toml"
        cfg.write_text(
            f'[server]\nlisten = "127.0.0.1:{smtp}"\nhostname = "bench-{self.serial}"\n'
            f"workers = 1\nproxy_protocol = {'true' if proxy else 'false'}\n"
            'trusted_proxies = ["127.0.0.1/32"]\nallow_networks = ["127.0.0.0/8"]\n'
            f'[spool]\ndirectory = "{self.work}/spool-{self.serial}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n\n{ups}'
        )
        args = [*SMTPB, "--log-level", "WARNING", "serve", "--config", str(cfg)]
        proc, log = self.spawn(args, f"instance-{self.serial}")
        wait_port(smtp, proc, log)
        return Instance(smtp, metrics, proc)

    def haproxy(self, a: Instance, b: Instance) -> int:
        port = free_port()
        env = dict(
            os.environ,
            SMTPB_BIND=f"127.0.0.1:{port}",
            SMTPB_INSTANCE_1=f"127.0.0.1:{a.smtp}",
            SMTPB_INSTANCE_2=f"127.0.0.1:{b.smtp}",
            SMTPB_RUNTIME_SOCKET=str(self.work / f"haproxy-{port}.sock"),
        )
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        proc, log = self.spawn([binary, "-db", "-f", str(HAPROXY_CFG)], f"haproxy-{port}", env=env)
        wait_port(port, proc, log)
        self.haproxy_pid = proc.pid
        return port

    def drained(self, instances: list[Instance], n: int) -> None:
        while True:
            received = sum(
                metric(i.metrics, "smtpbalancer_messages_received_total") for i in instances
            )
            queued = sum(metric(i.metrics, "smtpbalancer_queue_messages") for i in instances)
            if received >= n and queued == 0:
                return
            time.sleep(0.05)


def run_row(bench: Bench, count: int, args: argparse.Namespace) -> dict[str, float]:
    """count instances behind HAProxy; count 0: one instance, no HAProxy, no PROXY header."""
    first = len(bench.procs)
    instances = [bench.instance(proxy=count > 0) for _ in range(max(count, 1))]
    front = bench.haproxy(instances[0], instances[-1]) if count else instances[0].smtp
    generate(front, 200, args.clients, args.size)  # warm-up: connections, pools, caches
    bench.drained(instances, 200)
    pids = {
        "instances": [i.proc.pid for i in instances],
        "haproxy": [bench.haproxy_pid] if count else [],
        "sinks": bench.sink_pids,
    }
    cpu0 = {role: sum(map(own_cpu_seconds, ps)) for role, ps in pids.items()}
    gen0, box0 = children_cpu(), busy_cores()
    t0 = time.perf_counter()
    accept_s, ok = generate(front, args.n, args.clients, args.size)
    gen, box = children_cpu() - gen0, busy_cores()
    bench.drained(instances, 200 + args.n)
    end_to_end_s = time.perf_counter() - t0
    cpu = {role: sum(map(own_cpu_seconds, ps)) - cpu0[role] for role, ps in pids.items()}
    for proc in bench.procs[first:]:
        stop(proc)
    ms = 1000 / ok
    return {
        "accept": ok / accept_s,
        "e2e": ok / end_to_end_s,
        "cpu_ms": cpu["instances"] * ms,
        "haproxy_ms": cpu["haproxy"] * ms,
        "sinks_ms": cpu["sinks"] * ms,
        "gen_ms": gen * ms,
        # cores busy machine-wide while the load ran (other processes on the box included),
        # and how many of them were ours
        "busy": (box[0] - box0[0]) / (box[1] - box0[1]) * (os.cpu_count() or 1),
        "ours": (sum(cpu.values()) + gen) / accept_s,
    }


ROWS = {"direct, 1 instance": 0, "1 instance": 1, "2 instances": 2}


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="scaleout-", dir=args.spool_parent) as tmp:
        work = Path(tmp)
        sink_ports = [free_port() for _ in range(2)]
        bench = Bench(work, sink_ports)
        try:
            for i, port in enumerate(sink_ports):
                proc, log = bench.spawn(
                    [sys.executable, __file__, "--sink", str(port)], f"sink-{i}"
                )
                wait_port(port, proc, log)
                bench.sink_pids.append(proc.pid)
            rows: dict[str, list[dict[str, float]]] = {name: [] for name in ROWS}
            for r in range(args.rounds):
                order = list(ROWS) if r % 2 == 0 else list(reversed(ROWS))
                for name in order:
                    rows[name].append(run_row(bench, ROWS[name], args))
                    print(f"  round {r + 1}: {name}: {rows[name][-1]}", file=sys.stderr)
        finally:
            for proc in bench.procs:
                stop(proc)
    med = {
        name: {k: statistics.median(m[k] for m in runs) for k in runs[0]}
        for name, runs in rows.items()
    }
    base = med["1 instance"]
    print(
        f"{args.n} messages of {args.size} B, {args.clients} clients (reused connections), "
        f"HAProxy {HAPROXY_CFG.relative_to(ROOT)}, 2 sinks, {os.cpu_count()} CPUs, "
        f"median of {args.rounds} interleaved rounds"
    )
    print(
        f"  {'':18} {'accepted':>10} {'ratio':>6} {'end to end':>11} {'ratio':>6}"
        f"   CPU ms/msg: instances haproxy sinks load   cores: busy (ours)"
    )
    for name, m in med.items():
        print(
            f"  {name:18} {m['accept']:>6.0f} /s {m['accept'] / base['accept']:>6.2f}"
            f" {m['e2e']:>7.0f} /s {m['e2e'] / base['e2e']:>6.2f}"
            f"   {m['cpu_ms']:>20.2f} {m['haproxy_ms']:>7.2f} {m['sinks_ms']:>5.2f}"
            f" {m['gen_ms']:>4.2f}   {m['busy']:>4.2f} ({m['ours']:.2f}) of {os.cpu_count()}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--sink":
        asyncio.run(_sink(int(sys.argv[2])))
    if len(sys.argv) > 1 and sys.argv[1] == "--generate":
        port, n, clients, size = (int(a) for a in sys.argv[2:6])
        asyncio.run(_generate(port, n, clients, size))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spool-parent", default=None, help="where the spools go (a real disk)")
    main(parser.parse_args())
