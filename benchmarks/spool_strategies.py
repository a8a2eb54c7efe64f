"""Raw spool strategies on this disk, in one run: what does "durable before 250" cost?

Measures, with the same payloads and in the same process:
  A. one file per message, strictly sequential: write, fsync, rename, fsync(dir)
  B. smtpbalancer's SpoolStore: one file per message, concurrent stores on a thread
     pool, directory fsyncs shared between stores that finish together
  C. an append-only log, one fdatasync per batch of concurrent records (group commit)
and prints msg/s and ratios to A. Usage: python benchmarks/spool_strategies.py [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from smtpbalancer.clock import SystemClock
from smtpbalancer.envelope import Envelope
from smtpbalancer.spool.store import SpoolStore, fsync_dir, write_file


def sequential_files(directory: Path, payloads: list[bytes]) -> float:
    start = time.perf_counter()
    for i, payload in enumerate(payloads):
        write_file(directory / f"m{i}", (payload,))
        fsync_dir(directory)
    return time.perf_counter() - start


async def spool_store(directory: Path, payloads: list[bytes], concurrency: int) -> float:
    store = SpoolStore(directory, SystemClock())
    store.open()
    env = Envelope("a@b.test", ("c@d.test",))
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for p in payloads:
        queue.put_nowait(p)

    async def worker() -> None:
        while not queue.empty():
            await store.store(env, queue.get_nowait())

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="messages per strategy")
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes")
    parser.add_argument("--concurrency", type=int, default=20, help="concurrent sessions")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    args = parser.parse_args()
    payloads = [os.urandom(args.size) for _ in range(args.n)]
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="spoolbench-") as tmp:
        root = Path(tmp)
        for name in ("a", "b", "c"):
            (root / name).mkdir()
        results["A sequential file+fsync+rename+dirfsync"] = args.n / sequential_files(
            root / "a", payloads
        )
        results[f"B SpoolStore, {args.concurrency} concurrent"] = args.n / asyncio.run(
            spool_store(root / "b", payloads, args.concurrency)
        )
        results[f"C log, fdatasync per {args.concurrency}"] = args.n / group_commit_log(
            root / "c", payloads, args.concurrency
        )
    base = next(iter(results.values()))
    print(f"{args.n} messages of {args.size} bytes, same disk, same run")
    for name, rate in results.items():
        print(f"  {name:<45} {rate:>9.0f} msg/s   x{rate / base:.1f}")


if __name__ == "__main__":
    main()
