"""Raw spool strategies on this disk, in one run: what does "durable before 250" cost?

Measures, with the same payloads and in the same process:
  A. one file per message, strictly sequential: write, fsync, rename, fsync(dir)
  B. the same recipe with concurrent stores (the SpoolStore before the segment log):
     a thread pool, directory fsyncs shared between stores that finish together
  C. smtpbalancer's SpoolStore: the segment log, concurrent stores group-committed
     (one pwritev and one fdatasync per batch)
  D. a bare append-only log, one fdatasync per batch of `concurrency` records (the
     ceiling for C on this disk)
and prints msg/s, ratios to A and the CPU each costs per message (all threads).
With --recover N it also fills a spool with N messages through SpoolStore and times
a restart's recovery scan in a fresh process (wall time and peak RSS).
Usage: python benchmarks/spool_strategies.py [--n 2000] [--concurrency 20] [--recover 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from smtpbalancer.clock import SystemClock
from smtpbalancer.envelope import Envelope
from smtpbalancer.spool.segment import fsync_dir
from smtpbalancer.spool.sidecar import DirSync, write_file
from smtpbalancer.spool.store import SpoolStore

ENV = Envelope("a@b.test", ("c@d.test",))


def sequential_files(directory: Path, payloads: list[bytes]) -> float:
    start = time.perf_counter()
    for i, payload in enumerate(payloads):
        write_file(directory / f"m{i}", (payload,))
        fsync_dir(directory)
    return time.perf_counter() - start


async def concurrently(
    payloads: list[bytes], concurrency: int, store: Callable[[bytes], Awaitable[object]]
) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for p in payloads:
        queue.put_nowait(p)

    async def worker() -> None:
        while not queue.empty():
            await store(queue.get_nowait())

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


async def concurrent_files(directory: Path, payloads: list[bytes], concurrency: int) -> float:
    pool = ThreadPoolExecutor(max_workers=16)
    loop = asyncio.get_running_loop()

    async def in_thread(fn: Callable[..., object], *args: object) -> object:
        return await loop.run_in_executor(pool, fn, *args)

    dirsync = DirSync(directory, in_thread)
    names = iter(range(len(payloads)))

    async def store(payload: bytes) -> None:
        await in_thread(write_file, directory / f"m{next(names)}", (payload,))
        await dirsync.sync()

    try:
        return await concurrently(payloads, concurrency, store)
    finally:
        pool.shutdown()


async def spool_store(directory: Path, payloads: list[bytes], concurrency: int) -> float:
    store = SpoolStore(directory, SystemClock())
    store.open()
    try:
        return await concurrently(payloads, concurrency, lambda p: store.store(ENV, p))
    finally:
        store.close()


def group_commit_log(directory: Path, payloads: list[bytes], batch: int) -> float:
    fd = os.open(directory / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    start = time.perf_counter()
    try:
        for i in range(0, len(payloads), batch):
            os.write(fd, b"".join(payloads[i : i + batch]))
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


_RECOVER = """
import json, resource, sys, time
from pathlib import Path
from smtpbalancer.clock import SystemClock
from smtpbalancer.spool import recovery
from smtpbalancer.spool.store import SpoolStore
start = time.perf_counter()
store = SpoolStore(Path(sys.argv[1]), SystemClock())
store.open()
found = recovery.scan(store)
elapsed = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"messages": len(found.messages), "seconds": elapsed, "maxrss_kib": rss}))
store.close()
"""


def recovery_run(directory: Path, n: int, size: int) -> None:
    body = os.urandom(size)
    fill = asyncio.run(spool_store(directory, [body] * n, 100))
    out = subprocess.run(
        [sys.executable, "-c", _RECOVER, str(directory)], check=True, capture_output=True
    )
    doc = json.loads(out.stdout)
    print(f"recovery: {n} messages of {size} bytes spooled in {fill:.1f}s")
    print(
        f"  restart scan found {doc['messages']} in {doc['seconds']:.2f}s,"
        f" peak RSS {doc['maxrss_kib'] / 1024:.0f} MiB (the scanning process)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="messages per strategy")
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes")
    parser.add_argument("--concurrency", type=int, default=20, help="concurrent sessions")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--recover", type=int, default=0, help="also time recovery of N")
    args = parser.parse_args()
    payloads = [os.urandom(args.size) for _ in range(args.n)]
    c = args.concurrency
    results: dict[str, tuple[float, float]] = {}  # msg/s, CPU ms per message

    def measure(name: str, run: Callable[[], float]) -> None:
        cpu = time.process_time()  # every thread of this process, user + system
        elapsed = run()
        results[name] = (args.n / elapsed, (time.process_time() - cpu) * 1000 / args.n)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="spoolbench-") as tmp:
        root = Path(tmp)
        for name in ("a", "b", "c", "d", "r"):
            (root / name).mkdir()
        measure(
            "A sequential file+fsync+rename+dirfsync",
            lambda: sequential_files(root / "a", payloads),
        )
        measure(
            f"B files, {c} concurrent, shared dir fsync",
            lambda: asyncio.run(concurrent_files(root / "b", payloads, c)),
        )
        measure(
            f"C SpoolStore segment log, {c} concurrent",
            lambda: asyncio.run(spool_store(root / "c", payloads, c)),
        )
        measure(f"D bare log, fdatasync per {c}", lambda: group_commit_log(root / "d", payloads, c))
        base = next(iter(results.values()))[0]
        print(f"{args.n} messages of {args.size} bytes, same disk, same run")
        for name, (rate, cpu_ms) in results.items():
            print(f"  {name:<45} {rate:>9.0f} msg/s   x{rate / base:<5.1f} CPU {cpu_ms:.3f} ms/msg")
        if args.recover:
            recovery_run(root / "r", args.recover, args.size)


if __name__ == "__main__":
    main()
