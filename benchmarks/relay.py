"""End to end, in one run: the same load straight to sinks, then through smtpbalancer.

Sinks (`smtpbalancer sink`) and the proxy (`smtpbalancer serve`) run as separate
processes on 127.0.0.1; this script is the load generator (aiosmtplib, C reused
connections). For the proxy it reports the accept rate (250s/s), the end-to-end
rate (until /metrics shows every message delivered and the queue empty) and the
proxy's CPU per message, each next to the direct baseline measured in the same
run: ratios, because absolute numbers drift on a shared machine.
Usage: python benchmarks/relay.py [--n 5000] [--clients 20] [--size 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib
from peers import free_port, scrape_metric  # sibling modules: run as benchmarks/<script>.py
from procstat import own_cpu_seconds

SMTPB = [sys.executable, "-m", "smtpbalancer", "--log-level", "WARNING"]


async def load(port: int, n: int, clients: int, size: int) -> float:
    line = b"x" * 74 + b"\r\n"
    body = b"Subject: bench\r\n\r\n" + line * max(1, (size - 20) // len(line))
    counter = iter(range(n))

    async def client() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
        await smtp.connect()
        for _ in counter:
            await smtp.sendmail("bench@sender.test", ["r@rcpt.test"], body)
        await smtp.quit()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start


def metric(port: int, name: str) -> float:
    return scrape_metric(port, name) or 0.0


async def start(args: list[str], ready: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    stream = proc.stdout if ready == "sink listening" else proc.stderr
    while line := await asyncio.wait_for(stream.readline(), 20):
        if ready.encode() in line:
            # Keep reading both pipes: a full pipe would block the process on its next log line.
            for pipe in (proc.stdout, proc.stderr):
                _DRAINS.add(asyncio.create_task(_drain(pipe)))
            return proc
    raise RuntimeError(f"{args} did not start")


_DRAINS: set[asyncio.Task[None]] = set()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def main(n: int, clients: int, size: int, sinks_count: int, spool_parent: str | None) -> None:
    procs: list[asyncio.subprocess.Process] = []
    try:
        sink_ports = [free_port() for _ in range(sinks_count)]
        for port in sink_ports:
            procs.append(
                await start([*SMTPB, "sink", "--listen", f"127.0.0.1:{port}"], "sink listening")
            )
        direct = await load(sink_ports[0], n, clients, size)

        smtp_port, metrics_port = free_port(), free_port()
        with tempfile.TemporaryDirectory(prefix="relaybench-", dir=spool_parent) as tmp:
            cfg = Path(tmp) / "bench.toml"
            ups = "".join(
                f'[[upstream]]\nname = "sink{i}"\naddress = "127.0.0.1:{p}"\n\n'
                for i, p in enumerate(sink_ports)
            )
            cfg.write_text(
                f'[server]\nlisten = "127.0.0.1:{smtp_port}"\nhostname = "bench"\nworkers = 1\n'
                f'[spool]\ndirectory = "{tmp}/spool"\n'
                f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n\n{ups}'
            )
            proxy = await start([*SMTPB, "--log-level", "INFO", "serve", "--config", str(cfg)],
                                "smtpbalancer.ready")  # fmt: skip
            procs.append(proxy)
            cpu0 = own_cpu_seconds(proxy.pid)
            t0 = time.perf_counter()
            accept = await load(smtp_port, n, clients, size)
            while not (
                metric(metrics_port, "smtpbalancer_messages_received_total") >= n
                and metric(metrics_port, "smtpbalancer_queue_messages") == 0
            ):
                await asyncio.sleep(0.05)
            end_to_end = time.perf_counter() - t0
            cpu = own_cpu_seconds(proxy.pid) - cpu0
        print(
            f"{n} messages of {size} B, {clients} clients (reused connections), {sinks_count} sinks"
        )
        print(f"  direct to sink          {n / direct:>8.0f} msg/s")
        print(
            f"  smtpbalancer accepted   {n / accept:>8.0f} msg/s   {direct / accept:.2f} of direct"
        )
        print(f"  smtpbalancer end to end {n / end_to_end:>8.0f} msg/s")
        print(f"  smtpbalancer CPU        {cpu / n * 1000:>8.2f} ms/msg")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=2)
    parser.add_argument("--spool-parent", default=None, help="where the spool goes (a real disk)")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.clients, args.size, args.sinks, args.spool_parent))
