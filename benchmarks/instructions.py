"""Instructions per relayed message, smtpbalancer at several git revisions.

CPU seconds on this shared 2-core machine move by 15-25% from run to run; the number
of instructions a message costs does not. Each revision runs as one worker under
valgrind's callgrind, behind the suite's sinks and load generator: a warm-up batch,
then `--messages` with counting switched on (`callgrind_control -i on`) until the
queue is empty again, so the figure covers receiving, spooling, relaying and removing
each message, in every thread of the process. It is user-space work only (the kernel
side of system calls is not in it), and the process runs ~50x slower under valgrind,
so its loop turns gather more events than at full speed: use it to compare revisions,
next to `revisions.py` for seconds. Repeats of one revision agree within about 1%.

Usage: python benchmarks/instructions.py REV [REV ...] [--messages 2000]
           [--sessions 10] [--size 1024] [--repeat 1]
The first revision is the baseline; `.` is the working tree.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import peers  # sibling modules: run as benchmarks/<script>.py
import suite
from revisions import describe, export

WARM_UP = 300
START_TIMEOUT_S = 600.0  # imports under valgrind take a while


class Counted(peers.Smtpbalancer):
    """One worker of smtpbalancer under callgrind, counting only when told to."""

    def __init__(self, workdir: Path, code: Path | None) -> None:
        super().__init__(workdir, ["server.workers=1"], code=code)
        self.profile = workdir / "callgrind.out"

    def restart(self, timeout: float = START_TIMEOUT_S) -> float:
        args = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={self.profile}",
            sys.executable, "-m", "smtpbalancer", "serve", "--config", str(self.config_path),
        ]  # fmt: skip
        t0 = time.perf_counter()
        self.proc = peers.spawn(args, self.log, env=peers.serve_env(self.code), cwd=self.workdir)
        peers.wait_smtp(self.port, timeout, self.proc)
        return time.perf_counter() - t0

    def counting(self, on: bool) -> None:
        assert self.proc is not None
        control = ["callgrind_control", "-i", "on" if on else "off", str(self.proc.pid)]
        subprocess.run(control, check=True, capture_output=True)
        if not on:
            subprocess.run(["callgrind_control", "-d", str(self.proc.pid)], check=True,
                           capture_output=True)  # fmt: skip

    def instructions(self) -> int:
        total = 0
        for dump in self.workdir.glob(self.profile.name + "*"):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    total += int(line.split()[1])
        return total


def drain(target: Counted, timeout: float = 600) -> None:
    if suite.wait_for(target.queue_empty, timeout, every=0.2) is None:
        raise RuntimeError(f"the queue did not empty\n{peers.tail(target.log)}")


def batch(target: Counted, n: int, args: argparse.Namespace, work: Path) -> None:
    res: dict[str, Any] = suite.client_once(target.port, n, args.sessions, args.size, work)
    if res["accepted"] != n:
        raise RuntimeError(f"{res['accepted']} of {n} accepted: {res}")
    drain(target)


def count(code: Path | None, args: argparse.Namespace, work: Path) -> float:
    """Instructions per message for the package at `code` (None: the working tree)."""
    work.mkdir(parents=True)
    kind = "smtp-sink" if peers.which("smtp-sink") else "pysink"
    sinks = peers.Sinks(work, 2, kind).start()
    target = Counted(work, code)
    try:
        target.start(sinks, timeout=START_TIMEOUT_S)
        batch(target, WARM_UP, args, work)
        target.counting(True)
        batch(target, args.messages, args, work)
        target.counting(False)
        return target.instructions() / args.messages
    finally:
        target.stop()
        sinks.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", help="git revisions ('.' = working tree)")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install valgrind)", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="smtpinstr-"))
    try:
        codes = {rev: None if rev == "." else export(rev, work / f"code-{i}")
                 for i, rev in enumerate(args.revs)}  # fmt: skip
        per_rev: dict[str, list[float]] = {rev: [] for rev in args.revs}
        for r in range(args.repeat):
            for i, rev in enumerate(args.revs):
                ir = count(codes[rev], args, work / f"run-{r}-{i}")
                per_rev[rev].append(ir)
                print(f"repeat {r + 1}: {rev}: {ir:,.0f} instructions/message", flush=True)
        base = min(per_rev[args.revs[0]])
        print(f"\n{args.messages} messages of {args.size} B, {args.sessions} sessions, 1 worker")
        print("| revision | instructions per message | x first |")
        print("|---|---|---|")
        for rev in args.revs:
            best = min(per_rev[rev])
            label = "working tree" if rev == "." else describe(rev)
            print(f"| {label} | {best:,.0f} | x{best / base:.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
