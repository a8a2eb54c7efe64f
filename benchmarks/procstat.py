"""CPU time and memory of a process tree, read from /proc (Linux only).

A "tree" is a root process and every live descendant. Its CPU total is
`utime + stime + cutime + cstime` summed over the live members: a child that exited
and was reaped moved its whole total (its own reaped children included) into its
parent's `cutime`/`cstime`, so nothing is lost or counted twice as processes come
and go (Postfix's smtpd/cleanup/smtp processes, a proxy's worker processes). The
CPU of a run is the difference of two snapshots. A zombie not yet reaped still has
its /proc/PID/stat, so it counts too.

Memory: `VmHWM` (peak resident set) and `VmRSS` of each live member, summed; that
counts a shared library or a fork's shared pages once per process, so the Sampler
also sums `Pss` (/proc/PID/smaps_rollup: shared pages split between their users).
A Sampler thread polls the tree during a run and keeps the largest sums it saw;
a member that lived only between two polls is missed (Postfix's short-lived
helpers), which makes the Postfix figure a slight underestimate.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Fields after the command name (which may hold spaces and parentheses).
    return text.rsplit(")", 1)[1].split()


def parent_map() -> dict[int, list[int]]:
    """Children of every process, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree(roots: Iterable[int]) -> list[int]:
    """The roots that are alive and all their live descendants."""
    kids = parent_map()
    out: list[int] = []
    todo = [r for r in roots if Path(f"/proc/{r}").exists()]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def own_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its children not counted); 0 once it is gone."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime + cutime + cstime of these processes, in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # After ")": state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
            ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def tree_cpu(roots: Iterable[int]) -> float:
    return cpu_seconds(tree(roots))


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) in KiB; (0, 0) for a process that is gone."""
    hwm = rss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    break
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return hwm, rss


def pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split between their users), 0 if unavailable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def tree_memory_kib(roots: Iterable[int], pss: bool = False) -> tuple[int, int, int, int]:
    """(sum VmHWM, sum VmRSS, sum PSS or 0, process count) over the tree."""
    hwm = rss = pss_total = 0
    members = tree(roots)
    for pid in members:
        h, r = memory_kib(pid)
        hwm += h
        rss += r
        if pss:
            pss_total += pss_kib(pid)
    return hwm, rss, pss_total, len(members)


class Sampler:
    """Polls a tree's memory in a thread; keeps the peaks of the summed VmHWM and VmRSS."""

    def __init__(self, roots: Iterable[int], interval: float = 0.25) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peak_hwm_kib = 0
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        hwm, rss, pss, n = tree_memory_kib(self.roots, pss=True)
        self.peak_hwm_kib = max(self.peak_hwm_kib, hwm)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        self.peak_procs = max(self.peak_procs, n)

    def _run(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            t0 = time.perf_counter()
            self._sample()
            # Stay out of the measurement's way: with a big tree (Postfix at 100 sessions:
            # ~175 processes) one sample costs tens of ms, so poll less often then, keeping
            # the sampler under ~2.5% of one core.
            wait = max(self.interval, 40 * (time.perf_counter() - t0))

    def __enter__(self) -> Sampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def machine_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (all CPUs, everything but idle and iowait)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
