"""Host slowdowns: when the machine's CPUs run slow for everyone, seen by a small probe.

On a shared VM the host can slow every vCPU at once for tens of milliseconds. Inside
the guest this does not look like load: a task's CPU clock keeps running (the guest
cannot tell a slow CPU from a busy one), /proc/stat shows no steal, and `other_load_cores`
stays near zero. Measured on this suite's machine with nothing else running: a fixed
piece of pure-Python work took 10-14x its usual CPU time in windows of 20-80 ms, every
1-2 s, about 3% of the time. Every process is slowed together, so each message in
flight during such a window waits for it: at 100 sessions that is about 100 messages,
1% of a 10,000-message run, enough to set its p99.

The probe is a process of its own that does the same work (about 40 us of CPU) every
5 ms, under 1% of a core, and writes each sample's start (time.perf_counter, comparable
across processes) and the thread CPU time the work took. A sample whose work took at
least `SLOW_FACTOR` times the probe's median is slow; slow samples less than
`MERGE_GAP_S` apart make one window, from the first one's start to the last one's end,
if there are at least `MIN_SAMPLES` of them (an interrupt handled while the probe runs
is charged to its CPU time too, but lasts well under one sample).
The suite reports, per run, the time its client spent inside such windows and the p99
of the messages that were not in flight during one: the second is a diagnosis (is the
tail ours or the host's?), never a replacement for the p99 itself.

Usage (the suite starts and stops it): python benchmarks/hostprobe.py OUT
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import peers

INTERVAL_S = 0.005
WORK_LOOPS = 600  # about 40 us of CPU here
SLOW_FACTOR = 4.0
MERGE_GAP_S = 0.015  # three intervals
MIN_SAMPLES = 2  # a lone slow sample is an interrupt charged to the probe, not the host
FLUSH_EVERY_S = 0.1
MAX_LIFETIME_S = 4 * 3600  # in case nobody stops it


@dataclass(frozen=True)
class Sample:
    at: float  # perf_counter when the work started
    cpu_us: int  # thread CPU time the work took


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    slowdown: float  # the slowest sample's cost over the median

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000


def windows(samples: list[Sample], factor: float = SLOW_FACTOR) -> list[Window]:
    """The slow windows among `samples` (in time order), judged against their median."""
    if not samples:
        return []
    median = statistics.median(s.cpu_us for s in samples) or 1
    out: list[Window] = []
    current: list[float] | None = None  # start, end, worst ratio, slow samples
    for s in samples:
        ratio = s.cpu_us / median
        if ratio < factor:
            continue
        finish = s.at + s.cpu_us / 1e6
        if current is not None and s.at - current[1] <= MERGE_GAP_S:
            current[1] = max(current[1], finish)
            current[2] = max(current[2], ratio)
            current[3] += 1
            continue
        if current is not None and current[3] >= MIN_SAMPLES:
            out.append(Window(current[0], current[1], round(current[2], 1)))
        current = [s.at, finish, ratio, 1]
    if current is not None and current[3] >= MIN_SAMPLES:
        out.append(Window(current[0], current[1], round(current[2], 1)))
    return out


def overlap_s(found: list[Window], start: float, end: float) -> float:
    """Seconds of [start, end] inside the windows."""
    return sum(max(0.0, min(end, w.end) - max(start, w.start)) for w in found)


def outside(found: list[Window], intervals: list[tuple[float, float]]) -> list[int]:
    """Indexes of the intervals (start, end) that overlap none of the windows."""
    keep = []
    for i, (start, end) in enumerate(intervals):
        if not any(w.start < end and start < w.end for w in found):
            keep.append(i)
    return keep


def parse(text: str) -> list[Sample]:
    """The samples of the probe's output (complete lines only)."""
    samples = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            samples.append(Sample(float(parts[0]), int(parts[1])))
    return samples


class HostProbe:
    """The probe process, for the suite: start it, read its samples as it goes, stop it."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        self._samples: list[Sample] = []
        self._read = 0  # bytes of `out` parsed so far

    def samples(self) -> list[Sample]:
        """Every sample written so far (the file is read on from where it was left)."""
        try:
            with open(self.out, "rb") as f:
                f.seek(self._read)
                chunk = f.read()
        except OSError:
            return self._samples
        complete = chunk.rfind(b"\n") + 1  # a line still being written waits for next time
        self._samples += parse(chunk[:complete].decode())
        self._read += complete
        return self._samples

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(self.out)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        peers.stop_process(self.proc, 5)

    def samples_until(self, t: float, timeout: float = 2.0) -> list[Sample]:
        """Every sample so far, once the probe has written one past `t` (or the timeout)."""
        deadline = time.perf_counter() + timeout
        while True:
            samples = self.samples()
            alive = self.proc is not None and self.proc.poll() is None
            if (samples and samples[-1].at >= t) or not alive or time.perf_counter() > deadline:
                return samples
            time.sleep(FLUSH_EVERY_S / 2)


def _work() -> int:
    total = 0
    for i in range(WORK_LOOPS):
        total += i * i
    return total


def main(argv: list[str]) -> int:
    out = open(argv[0], "w", buffering=1 << 16)  # noqa: SIM115 -- flushed by hand
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()
    end = time.perf_counter() + MAX_LIFETIME_S
    flushed = time.perf_counter()
    while not stop and os.getppid() == parent:
        at = time.perf_counter()
        cpu0 = time.thread_time_ns()
        _work()
        cpu = time.thread_time_ns() - cpu0
        out.write(f"{at:.6f} {cpu // 1000}\n")
        if at - flushed >= FLUSH_EVERY_S:
            out.flush()
            flushed = at
        if at > end:
            break
        time.sleep(INTERVAL_S)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
