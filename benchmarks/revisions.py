"""One suite cell, smtpbalancer at several git revisions, in one run: before and after.

Each revision's package is exported with `git archive` and run exactly as the suite
runs smtpbalancer (same config, sinks, load generator and measurement: suite.run_path).
Revisions are interleaved within each repeat, so drift on a shared machine spreads over
all of them; the table gives the median (and range) per revision and ratios to the
first revision, taken within each repeat. *p99 outside host slow*: the p99 without the
messages in flight while the host probe saw the machine's CPUs slow (hostprobe.py).
*p99 as read*: to when the load generator read each final reply, not when it arrived.

Usage: python benchmarks/revisions.py REV [REV ...] [--cell 1k-20s-reuse]
           [--messages 10000] [--repeat 3] [--client loadgen|smtp-source]
           [--set server.workers=1]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import peers  # sibling modules: run as benchmarks/<script>.py
import suite

REPO = Path(__file__).resolve().parent.parent


def export(rev: str, dest: Path) -> Path:
    """The smtpbalancer package as it is at `rev`, unpacked under `dest`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "smtpbalancer"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def describe(rev: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h %s", rev],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return out if len(out) <= 60 else out[:57] + "..."


def parse_cell(slug: str) -> suite.Cell:
    size, sessions, reuse = slug.split("-")
    return suite.Cell(int(size.removesuffix("k")) * 1024, int(sessions.removesuffix("s")),
                      reuse == "reuse")  # fmt: skip


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mid = format(statistics.median(values), fmt)
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return mid if lo == hi else f"{mid} ({lo}-{hi})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", help="git revisions; the first is the baseline")
    parser.add_argument("--cell", default="1k-20s-reuse")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--client", choices=("loadgen", "smtp-source"), default="loadgen")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()

    cell = parse_cell(args.cell)
    sink_kind = "smtp-sink" if peers.which("smtp-sink") else "pysink"
    work = Path(tempfile.mkdtemp(prefix="smtprevs-"))
    ctx = suite.Context(
        argparse.Namespace(keep=False, set=args.set), suite.MODES["full"], work, sink_kind
    )
    ctx.probe = suite.hostprobe.HostProbe(work / "hostprobe.txt")  # see hostprobe.py
    ctx.probe.start()
    try:
        codes = {rev: export(rev, work / f"code-{i}") for i, rev in enumerate(args.revs)}
        rows: dict[str, list[dict[str, Any]]] = {rev: [] for rev in args.revs}
        for repeat in range(args.repeat):
            suite.say(f"[repeat {repeat + 1}/{args.repeat}] {cell.slug}: {args.messages} messages")
            for rev in args.revs:
                ctx.code = codes[rev]
                row = suite.run_path(ctx, "smtpbalancer", cell, args.messages, repeat, args.client)
                row["path"] = rev[:12]
                suite.show_row(row)
                rows[rev].append(row)
        report(args, cell, rows)
    finally:
        ctx.probe.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 1 if ctx.failures else 0


def report(
    args: argparse.Namespace, cell: suite.Cell, rows: dict[str, list[dict[str, Any]]]
) -> None:
    base = rows[args.revs[0]]
    print(f"\n{cell.slug}, {args.messages} messages, client {args.client}, {args.repeat} repeat(s)"
          f"{', ' + ' '.join(args.set) if args.set else ''}")  # fmt: skip
    print(
        "| revision | accepted msg/s | end-to-end msg/s | p99 ms | p99 as read ms"
        " | p99 outside host slow ms | CPU ms/msg | e2e x first | CPU x first |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rev, runs in rows.items():
        ok = [
            (r, b) for r, b in zip(runs, base, strict=True) if "error" not in r and "error" not in b
        ]
        e2e_x = [r["e2e_rate"] / b["e2e_rate"] for r, b in ok if r["e2e_rate"] and b["e2e_rate"]]
        cpu_x = [r["cpu_s_per_1000"] / b["cpu_s_per_1000"] for r, b in ok
                 if r["cpu_s_per_1000"] and b["cpu_s_per_1000"]]  # fmt: skip
        good = [r for r in runs if "error" not in r]
        clear = [r["p99_outside_host_ms"] for r in good if r.get("p99_outside_host_ms") is not None]
        print(
            f"| {describe(rev)} | {spread([r['accept_rate'] for r in good], ',.0f')}"
            f" | {spread([r['e2e_rate'] for r in good if r['e2e_rate']], ',.0f')}"
            f" | {spread([r['p99_ms'] for r in good if r['p99_ms'] is not None], '.1f')}"
            f" | {spread([r['p99_read_ms'] for r in good if r.get('p99_read_ms')], '.1f')}"
            f" | {spread(clear, '.1f')}"
            f" | {spread([r['cpu_s_per_1000'] for r in good if r['cpu_s_per_1000']], '.2f')}"
            f" | x{spread(e2e_x, '.2f')} | x{spread(cpu_x, '.2f')} |"
        )


if __name__ == "__main__":
    sys.exit(main())
