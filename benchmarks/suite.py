"""The benchmark suite (issue 6): four mail paths, same client, same sinks, same run.

    .venv/bin/python benchmarks/suite.py [--quick | --smoke] [--out DIR] [--repeat N]

Paths: (a) client -> sink direct, (b) HAProxy (TCP mode) -> 2 sinks, (c) a private
Postfix instance relaying through its durable queue -> 1 sink, (d) smtpbalancer -> 2
sinks. Matrix: 1 KiB and 50 KiB messages x 20 and 100 concurrent sessions x reused
connections and one message per connection; every cell runs every path, and the
whole matrix is repeated (ratios are taken within one repeat, then summarised).
Then the scale runs (smtpbalancer only): accept rate as the queue grows to 100k,
RSS with 100k queued, restart time to accepting with 100k queued, recovery
throughput. Writes OUT/latest.json, OUT/latest.png (when matplotlib is installed),
regenerates benchmarks/RESULTS.md (not in --smoke) and prints a table.

Installs Postfix and HAProxy with apt-get when they are missing and it may (root,
apt-get present, not --smoke, not --no-install); a path that cannot run is skipped
with the reason in the output. Never fails because the machine is slow: the exit
status is 0 unless a run broke (a process did not start, messages went missing).
See benchmarks/README.md for what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostprobe
import peers
import procstat
import report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PATHS = ("direct", "haproxy", "postfix", "smtpbalancer")
SINKS_PER_PATH = {"direct": 2, "haproxy": 2, "postfix": 1, "smtpbalancer": 2}


@dataclass(frozen=True)
class Cell:
    size: int
    sessions: int
    reuse: bool

    @property
    def slug(self) -> str:
        return f"{self.size // 1024}k-{self.sessions}s-{'reuse' if self.reuse else 'perconn'}"


@dataclass(frozen=True)
class Mode:
    name: str
    sizes: tuple[int, ...]
    sessions: tuple[int, ...]
    reuse: tuple[bool, ...]
    messages: dict[int, int]  # per message size
    repeat: int
    scale_total: int  # messages queued for the scale runs (0 = no scale runs)
    scale_batch: int  # messages per accept-rate measurement
    e2e_timeout: float  # seconds after the client finished
    client_timeout: float

    def cells(self) -> list[Cell]:
        return [
            Cell(size, sessions, reuse)
            for size in self.sizes
            for sessions in self.sessions
            for reuse in self.reuse
        ]


MODES = {
    "full": Mode(
        "full", (1024, 51200), (20, 100), (True, False), {1024: 10_000, 51200: 4_000},
        repeat=3, scale_total=100_000, scale_batch=10_000, e2e_timeout=600, client_timeout=1800,
    ),
    "quick": Mode(
        "quick", (1024, 51200), (20, 100), (True, False), {1024: 2_000, 51200: 800},
        repeat=1, scale_total=20_000, scale_batch=4_000, e2e_timeout=300, client_timeout=900,
    ),
    "smoke": Mode(
        "smoke", (1024,), (10,), (True, False), {1024: 50},
        repeat=1, scale_total=100, scale_batch=50, e2e_timeout=15, client_timeout=20,
    ),
}  # fmt: skip


class Context:
    def __init__(self, args: argparse.Namespace, mode: Mode, work: Path, sink_kind: str) -> None:
        self.args = args
        self.mode = mode
        self.work = work
        self.sink_kind = sink_kind
        self.overrides: list[str] = list(args.set or [])
        self.counter = 0
        self.failures: list[str] = []
        self.code: Path | None = None  # the snapshot of the package under test
        self.probe: hostprobe.HostProbe | None = None

    def rundir(self, label: str) -> Path:
        self.counter += 1
        d = self.work / f"{self.counter:03d}-{label}"
        d.mkdir()
        return d


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- setup


def ensure_packages(allow: bool) -> list[str]:
    """apt-get install postfix haproxy when missing and allowed; returns notes."""
    missing = [pkg for pkg in ("postfix", "haproxy") if peers.which(pkg) is None]
    if not missing:
        return []
    if not allow:
        return [f"not installed: {', '.join(missing)} (installation not attempted)"]
    if os.geteuid() != 0 or peers.which("apt-get") is None:
        return [f"not installed: {', '.join(missing)} (installing needs root and apt-get)"]
    say(f"installing {' '.join(missing)} with apt-get ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if "postfix" in missing and peers.which("debconf-set-selections"):
        # "No configuration": the package sets up no system instance and starts nothing;
        # the suite only ever runs its own private instance.
        subprocess.run(
            ["debconf-set-selections"], input="postfix postfix/main_mailer_type select "
            "No configuration\n", text=True, env=env, check=False, capture_output=True,
        )  # fmt: skip
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    res = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        res = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    still = [pkg for pkg in missing if peers.which(pkg) is None]
    if still:
        why = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        return [f"apt-get could not install {', '.join(still)}: {why[0]}"]
    return [f"installed with apt-get: {', '.join(missing)}"]


def available_paths(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    skipped: dict[str, str] = {}
    if "haproxy" in wanted and peers.which("haproxy") is None:
        skipped["haproxy"] = "haproxy is not installed"
    if "postfix" in wanted and (why := peers.Postfix.unavailable()):
        skipped["postfix"] = why
    return [p for p in PATHS if p in wanted and p not in skipped], skipped


def machine(work: Path) -> dict[str, Any]:
    def cpuinfo(key: str) -> str:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"

    def meminfo() -> str:
        try:
            kib = int(Path("/proc/meminfo").read_text().split()[1])
            return f"{kib / 1024 / 1024:.1f} GiB"
        except (OSError, ValueError, IndexError):
            return "?"

    def distro() -> str:
        try:
            for line in Path("/etc/os-release").read_text().splitlines():
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip('"')
        except OSError:
            pass
        return platform.system()

    def filesystem(path: Path) -> str:
        best, kind = "", "?"
        try:
            for line in Path("/proc/mounts").read_text().splitlines():
                dev, mnt, fstype = line.split()[:3]
                if str(path).startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, f"{fstype} ({dev})"
        except OSError:
            pass
        return kind

    def git() -> str:
        try:
            head = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.strip()  # fmt: skip
            dirty = subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--", "smtpbalancer"],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout.strip()  # fmt: skip
            return head + (" + uncommitted changes in smtpbalancer/" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            return "?"

    return {
        "cpu": cpuinfo("model name"),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory": meminfo(),
        "kernel": platform.release(),
        "os": distro(),
        "python": platform.python_version(),
        "work_dir_filesystem": filesystem(work),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git(),
    }


# ----------------------------------------------------------------------------- runs


def make_target(path: str, work: Path, ctx: Context, cell: Cell) -> peers.Target:
    if path == "haproxy":
        return peers.HAProxy(work)
    if path == "postfix":
        return peers.Postfix(work, sessions=cell.sessions)
    if path == "smtpbalancer":
        return peers.Smtpbalancer(work, ctx.overrides, code=ctx.code)
    return peers.Target(work)


def launch_client(
    client: str, ports: list[int], n: int, cell: Cell, out: Path
) -> subprocess.Popen[bytes]:
    port = ports[0]
    if client == "smtp-source":
        exe = peers.which("smtp-source")
        assert exe is not None
        args = [exe, *(["-d"] if cell.reuse else []), "-s", str(cell.sessions), "-m", str(n),
                "-l", str(max(1, cell.size - 250)), "-f", "bench@sender.test",
                "-t", "rcpt@rcpt.test", "-M", "loadgen.bench.test",
                f"127.0.0.1:{port}"]  # fmt: skip
    else:
        args = [sys.executable, str(HERE / "loadgen.py"), "--port", ",".join(map(str, ports)),
                "--messages", str(n), "--sessions", str(cell.sessions), "--size", str(cell.size),
                *([] if cell.reuse else ["--per-connection"])]  # fmt: skip
    with open(out, "wb") as f, open(out.with_suffix(".err"), "wb") as err:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=f, stderr=err, start_new_session=True
        )


def percentile(sorted_values: list[int], q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx] / 1000.0  # microseconds -> ms


def wait_client(proc: subprocess.Popen[bytes], timeout: float, tick: Any) -> int:
    t0 = time.perf_counter()
    while proc.poll() is None:
        tick()
        if time.perf_counter() - t0 > timeout:
            peers.stop_process(proc, 2)
            raise TimeoutError(f"client did not finish within {timeout:.0f}s")
        time.sleep(0.01)
    return proc.returncode


def measure(
    ctx: Context,
    target: peers.Target,
    sinks: peers.Sinks,
    cell: Cell,
    n: int,
    client: str,
    work: Path,
) -> dict[str, Any]:
    """Send n messages through `target`; wait until the sinks counted them and it is empty."""
    roots = target.roots
    cpu0 = procstat.tree_cpu(roots)
    sink_cpu0 = procstat.tree_cpu(sinks.pids)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, wall0 = procstat.machine_cpu_seconds(), time.perf_counter()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    samples: list[tuple[float, int]] = []

    def tick() -> None:
        c = sinks.count()
        if not samples or c != samples[-1][1]:
            samples.append((time.perf_counter(), c))

    out = work / f"client-{client}.json"
    with procstat.Sampler(roots) as mem:
        t_launch = time.perf_counter()
        proc = launch_client(client, target.client_ports or [target.port], n, cell, out)
        try:
            code = wait_client(proc, ctx.mode.client_timeout, tick)
        finally:
            peers.stop_process(proc, 2)  # only when interrupted: it has exited otherwise
        t_exit = time.perf_counter()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        stderr = out.with_suffix(".err").read_text(errors="replace")
        if client == "loadgen":
            if code != 0:
                raise RuntimeError(f"load generator failed ({code}): {stderr[-2000:]}")
            res = json.loads(out.read_text())
            t_start, t_end = float(res["t_start"]), float(res["t_end"])
            accepted, rejected, errors = res["accepted"], res["rejected"], res["errors"]
            lat = sorted(res["latencies_us"])
            read = sorted(res["read_latencies_us"])
            answered = list(zip(res["answered_us"], res["latencies_us"], strict=True))
        else:  # smtp-source: exit 0 means every message got its 250
            t_start, t_end = t_launch, t_exit
            accepted = n if code == 0 else 0
            rejected, errors, lat, read, answered = 0, (0 if code == 0 else n), [], [], []
            res = {"reject_codes": {}, "error_kinds": {} if code == 0 else {"exit": code}}
        deadline = time.perf_counter() + ctx.mode.e2e_timeout
        complete = True
        while sinks.count() < accepted:
            if time.perf_counter() > deadline:
                complete = False
                break
            tick()
            time.sleep(0.01)
        tick()
        t_counted = next((t for t, c in samples if c >= accepted), time.perf_counter())
        t_done = t_counted
        if complete and not target.queue_empty():
            while not target.queue_empty():
                if time.perf_counter() > deadline:
                    complete = False
                    break
                time.sleep(0.02)
            t_done = time.perf_counter()
        cpu1 = procstat.tree_cpu(roots)
        sink_cpu1 = procstat.tree_cpu(sinks.pids)
        busy1, wall1 = procstat.machine_cpu_seconds(), time.perf_counter()
        self1 = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(0.2)  # a late duplicate would show up here
    sink_count = sinks.count()
    accept_s = max(t_end - t_start, 1e-9)
    e2e_s = max(t_done - t_start, accept_s)
    cpu = cpu1 - cpu0 if roots else None
    client_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    suite_cpu = (self1.ru_utime - self0.ru_utime) + (self1.ru_stime - self0.ru_stime)
    ours = (cpu or 0.0) + client_cpu + (sink_cpu1 - sink_cpu0) + suite_cpu
    wall = max(wall1 - wall0, 1e-9)
    return {
        "client": client,
        "messages": n,
        "accepted": accepted,
        "rejected": rejected,
        "errors": errors,
        "reject_codes": res.get("reject_codes", {}),
        "error_kinds": res.get("error_kinds", {}),
        "sink_count": sink_count,
        "complete": complete and sink_count >= accepted,
        "accept_s": round(accept_s, 4),
        "accept_rate": round(accepted / accept_s, 1),
        "e2e_s": round(e2e_s, 4) if complete else None,
        "e2e_rate": round(accepted / e2e_s, 1) if complete else None,
        "p50_ms": percentile(lat, 0.50),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": percentile(lat, 1.0),
        # the same, to when the load generator read each reply (its own delays included)
        "p99_read_ms": percentile(read, 0.99),
        "cpu_s": round(cpu, 3) if cpu is not None else None,
        "cpu_s_per_1000": round(cpu / max(accepted, 1) * 1000, 4) if cpu is not None else None,
        "peak_rss_mb": round(mem.peak_hwm_kib / 1024, 1) if roots else None,
        "peak_rss_sampled_mb": round(mem.peak_rss_kib / 1024, 1) if roots else None,
        "peak_pss_mb": round(mem.peak_pss_kib / 1024, 1) if roots else None,
        "processes": mem.peak_procs if roots else 0,
        "client_cpu_s": round(client_cpu, 3),
        "suite_cpu_s": round(suite_cpu, 3),  # this script: polling the sinks, sampling memory
        # Cores kept busy during the run by everything else on the machine (other jobs, the
        # kernel's own threads): the noise floor of this run's figures.
        "other_load_cores": round(max(0.0, (busy1 - busy0) - ours) / wall, 2),
        "sink_cpu_s": round(sink_cpu1 - sink_cpu0, 3),
        **host_slowdowns(ctx, t_start, t_end, answered),
    }


def host_slowdowns(
    ctx: Context, t_start: float, t_end: float, answered: list[tuple[int, int]]
) -> dict[str, Any]:
    """What the host probe saw during the client's run (hostprobe.py): the time spent in
    slow windows, and the p99 of the messages not in flight during one of them."""
    if ctx.probe is None:
        return {}
    found = [
        w
        for w in hostprobe.windows(ctx.probe.samples_until(t_end))
        if w.end > t_start and w.start < t_end
    ]
    out: dict[str, Any] = {
        "host_slow_ms": round(hostprobe.overlap_s(found, t_start, t_end) * 1000, 1),
        "host_windows": len(found),
        "host_slowdown": max((w.slowdown for w in found), default=None),
    }
    if answered:
        spans = [(t_start + (a - lat) / 1e6, t_start + a / 1e6) for a, lat in answered]
        clear = sorted(answered[i][1] for i in hostprobe.outside(found, spans))
        out["p99_outside_host_ms"] = percentile(clear, 0.99)
        out["in_host_windows"] = len(answered) - len(clear)  # messages in flight in one
    return out


def start_with_retry(target: peers.Target, sinks: peers.Sinks) -> None:
    """Start, and once more on failure: a free port picked for it may be taken meanwhile by
    another program on a busy machine (the retry picks new ports)."""
    try:
        target.start(sinks)
    except (RuntimeError, TimeoutError, OSError) as exc:
        say(f"  {target.name}: start failed ({str(exc).splitlines()[0]}); retrying once")
        target.stop()
        time.sleep(1.0)
        target.start(sinks)


def run_path(
    ctx: Context, path: str, cell: Cell, n: int, repeat: int, client: str = "loadgen"
) -> dict[str, Any]:
    work = ctx.rundir(f"{path}-{cell.slug}-{client}")
    sinks = peers.Sinks(work, SINKS_PER_PATH[path], ctx.sink_kind)
    target = make_target(path, work, ctx, cell)
    row: dict[str, Any] = {
        "path": path, "size": cell.size, "sessions": cell.sessions, "reuse": cell.reuse,
        "repeat": repeat,
    }  # fmt: skip
    try:
        sinks.start()
        start_with_retry(target, sinks)
        row.update(measure(ctx, target, sinks, cell, n, client, work))
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.SubprocessError) as exc:
        row.update({"client": client, "messages": n, "error": str(exc)[-3000:]})
        ctx.failures.append(f"{path} {cell.slug} ({client}): {str(exc).splitlines()[0]}")
    finally:
        target.stop()
        sinks.stop()
    if "error" not in row and not row["complete"]:
        ctx.failures.append(
            f"{path} {cell.slug} ({client}): sinks counted {row['sink_count']} of "
            f"{row['accepted']} accepted within {ctx.mode.e2e_timeout:.0f}s"
        )
    if not ctx.args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def show_row(row: dict[str, Any]) -> None:
    if "error" in row:
        say(f"  {row['path']:<12} FAILED: {row['error'].splitlines()[0]}")
        return
    e2e = f"{row['e2e_rate']:>8.0f}" if row["e2e_rate"] else "  (none)"
    p99 = f"{row['p99_ms']:.1f}" if row["p99_ms"] is not None else "-"
    cpu = f"{row['cpu_s_per_1000']:.2f}" if row["cpu_s_per_1000"] is not None else "-"
    lost = "" if row["complete"] else f"  INCOMPLETE sink={row['sink_count']}"
    say(
        f"  {row['path']:<12} accept {row['accept_rate']:>8.0f}/s  e2e {e2e}/s  "
        f"p99 {p99:>6} ms  cpu {cpu:>6} s/1k  rss {row['peak_rss_mb'] or '-'} MB{lost}"
    )


# ---------------------------------------------------------------------------- scale


def client_once(port: int, n: int, sessions: int, size: int, work: Path) -> dict[str, Any]:
    out = work / "scale-client.json"
    proc = launch_client("loadgen", [port], n, Cell(size, sessions, True), out)
    try:
        proc.wait(timeout=3600)
    finally:
        peers.stop_process(proc, 2)  # only on a timeout or Ctrl-C: it has exited otherwise
    if proc.returncode != 0:
        err = out.with_suffix(".err").read_text(errors="replace")
        raise RuntimeError(f"load generator failed: {err[-2000:]}")
    res: dict[str, Any] = json.loads(out.read_text())
    lat = sorted(res.pop("latencies_us"))
    res["rate"] = round(res["accepted"] / max(res["t_end"] - res["t_start"], 1e-9), 1)
    res["p99_ms"] = percentile(lat, 0.99)
    return res


def wait_for(check: Any, timeout: float, every: float = 0.05) -> float | None:
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > timeout:
            return None
        time.sleep(every)
    return time.perf_counter() - t0


PAIRS = 5  # interleaved full/fresh batch pairs in the scale comparison (not in --smoke)


def paired_batches(
    ctx: Context, work: Path, full: peers.Smtpbalancer, batch: int, queued: int
) -> dict[str, Any]:
    """The same batch against the full instance (restarted, relays still down) and a fresh
    one (empty spool, relays down too), alternating and in both orders, so the machine's
    drift falls on both alike; the verdict is the median of the per-pair ratios. Single
    pairs spread by +-15% on this machine, so three could land either side of a 10%
    limit by chance: five pairs, still short next to the growing series. Both spools keep
    what they accept: `full_accepted` is what the full one took."""
    pairs = 1 if ctx.mode.name == "smoke" else PAIRS
    (work / "empty").mkdir(parents=True, exist_ok=True)
    sinks = peers.Sinks(work / "empty", 2, ctx.sink_kind)  # reserved, never started
    empty = peers.Smtpbalancer(
        work / "empty", ctx.overrides, spool=work / "empty" / "spool", code=ctx.code
    )
    out: dict[str, Any] = {"pairs": []}
    try:
        empty.start(sinks)
        # Both warm up first: the fresh instance, and the full one, just restarted.
        warm = client_once(empty.port, max(20, batch // 5), 20, 1024, work)
        queued_empty = warm["accepted"]
        warm = client_once(full.port, max(20, batch // 5), 20, 1024, work)
        out["full_accepted"] = warm["accepted"]
        queued += warm["accepted"]
        for i in range(pairs):
            pair: dict[str, Any] = {}
            order = (("full", full), ("empty", empty)) if i % 2 == 0 else (
                ("empty", empty), ("full", full))  # fmt: skip
            for name, sb in order:
                res = client_once(sb.port, batch, 20, 1024, work)
                before = queued if name == "full" else queued_empty
                pair[name] = {"queued_before": before, "rate": res["rate"],
                              "accepted": res["accepted"]}  # fmt: skip
                if name == "full":
                    queued += res["accepted"]
                    out["full_accepted"] += res["accepted"]
                else:
                    queued_empty += res["accepted"]
            # four places: a ratio rounded to 0.9 must not pass a limit that 0.8998 misses
            pair["ratio"] = round(pair["full"]["rate"] / max(pair["empty"]["rate"], 1e-9), 4)
            say(
                f"  scale pair {i + 1}: {pair['full']['rate']:.0f}/s with "
                f"{pair['full']['queued_before']} queued vs {pair['empty']['rate']:.0f}/s with "
                f"{pair['empty']['queued_before']}, x{pair['ratio']:.2f}"
            )
            out["pairs"].append(pair)
    finally:
        empty.stop()
    ratios = [p["ratio"] for p in out["pairs"]]
    out["ratio"] = statistics.median(ratios)
    out["ratio_min"], out["ratio_max"] = min(ratios), max(ratios)
    out["full_rate"] = statistics.median(p["full"]["rate"] for p in out["pairs"])
    out["empty_rate"] = statistics.median(p["empty"]["rate"] for p in out["pairs"])
    out["full_queued_min"] = min(p["full"]["queued_before"] for p in out["pairs"])
    out["empty_queued_max"] = max(p["empty"]["queued_before"] for p in out["pairs"])
    return out


def scale_run(ctx: Context, total: int, batch: int) -> dict[str, Any]:
    """Accept rate as the queue grows to `total`, RSS, restart and recovery with it queued."""
    work = ctx.rundir("scale")
    spool = work / "spool"
    sinks = peers.Sinks(work, 2, ctx.sink_kind)  # ports reserved; started only for recovery
    sb = peers.Smtpbalancer(work, ctx.overrides, spool=spool, code=ctx.code)
    out: dict[str, Any] = {"queued_target": total, "batch": batch, "sessions": 20, "size": 1024}
    timeout = max(120.0, total / 20)
    try:
        sb.start(sinks)  # upstreams down: every accepted message stays queued
        out["start_empty_s"] = round(sb.ready_s, 3)
        # A first, short batch warms the instance up (imports, thread pools, connections), so
        # the "empty queue" figure is not the cold start's; it leaves a little queued.
        warm = client_once(sb.port, max(20, batch // 5), 20, 1024, work)
        out["warmup"] = {"messages": warm["accepted"], "rate": warm["rate"]}
        series: list[dict[str, Any]] = []
        queued = warm["accepted"]
        while True:
            res = client_once(sb.port, batch, 20, 1024, work)
            series.append(
                {
                    "queued_before": queued,
                    "rate": res["rate"],
                    "p99_ms": res["p99_ms"],
                    "accepted": res["accepted"],
                }
            )
            queued += res["accepted"]
            say(f"  scale: {queued:>7} queued, last {batch} accepted at {res['rate']:.0f}/s")
            if queued - res["accepted"] >= total:
                break
            if res["accepted"] == 0:
                raise RuntimeError(f"nothing accepted: {res['reject_codes']} {res['error_kinds']}")
        out["series"] = series
        out["accept_empty_rate"] = series[0]["rate"]
        out["accept_full_rate"] = series[-1]["rate"]
        out["accept_full_queued"] = series[-1]["queued_before"]
        out["accept_ratio"] = round(series[-1]["rate"] / max(series[0]["rate"], 1e-9), 3)
        wait_for(lambda: sb.queue_messages() == queued, 30)
        out["queued"] = queued
        out["queue_metric"] = sb.queue_messages()
        hwm, rss, pss, _n = procstat.tree_memory_kib(sb.roots, pss=True)
        out["rss_queued_mb"], out["hwm_queued_mb"] = round(rss / 1024, 1), round(hwm / 1024, 1)
        out["pss_queued_mb"] = round(pss / 1024, 1)

        # Restart with everything still queued and the relays still down.
        t0 = time.perf_counter()
        sb.stop()
        out["stop_s"] = round(time.perf_counter() - t0, 3)
        out["restart_s"] = round(sb.restart(timeout), 3)
        recovered = wait_for(lambda: sb.queue_messages() == queued, timeout, 0.02)
        out["restart_metrics_s"] = (
            round(out["restart_s"] + recovered, 3) if recovered is not None else None
        )
        time.sleep(0.3 if ctx.mode.name == "smoke" else 2.0)  # let the recovered queue settle
        hwm, rss, pss, _n = procstat.tree_memory_kib(sb.roots, pss=True)
        out["rss_restarted_mb"] = round(rss / 1024, 1)
        out["hwm_restarted_mb"] = round(hwm / 1024, 1)
        out["pss_restarted_mb"] = round(pss / 1024, 1)
        # After the figures above, which stay at the queue size they always had.
        out["queued_measured"] = queued  # the queue at the RSS and restart figures
        out["paired"] = paired_batches(ctx, work, sb, batch, queued)
        queued += out["paired"]["full_accepted"]
        out["queued"] = queued  # what recovery drains
        sb.stop()

        # Recovery: relays up, restart, drain everything.
        sinks.start()
        cpu_sinks0 = procstat.tree_cpu(sinks.pids)
        t0 = time.perf_counter()
        out["restart_with_relays_s"] = round(sb.restart(timeout), 3)
        cpu0 = procstat.tree_cpu(sb.roots)
        with procstat.Sampler(sb.roots) as mem:
            drained = wait_for(
                lambda: sinks.count() >= queued and sb.queue_messages() == 0, timeout * 4, 0.05
            )
            cpu1 = procstat.tree_cpu(sb.roots)
        out["recovery_complete"] = drained is not None
        out["recovery_sink_count"] = sinks.count()
        if drained is not None:
            drain_s = time.perf_counter() - t0
            out["recovery_s"] = round(drain_s, 2)
            out["recovery_rate"] = round(queued / drain_s, 1)
            out["recovery_cpu_s_per_1000"] = round((cpu1 - cpu0) / max(queued, 1) * 1000, 4)
        out["recovery_peak_rss_mb"] = round(mem.peak_hwm_kib / 1024, 1)
        out["recovery_sink_cpu_s"] = round(procstat.tree_cpu(sinks.pids) - cpu_sinks0, 2)
        if drained is None:
            ctx.failures.append(
                f"scale: recovery incomplete ({sinks.count()} of {queued} at the sinks)"
            )
    except (RuntimeError, TimeoutError, OSError, ValueError, subprocess.SubprocessError) as exc:
        out["error"] = str(exc)[-3000:]
        ctx.failures.append(f"scale: {str(exc).splitlines()[0]}")
    finally:
        sb.stop()
        sinks.stop()
    if not ctx.args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="smtpbalancer benchmark suite: direct, HAProxy, Postfix and smtpbalancer.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller counts, one repeat, 20k scale")
    size.add_argument("--smoke", action="store_true", help="tiny counts for CI; never installs")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where latest.json/png go")
    p.add_argument(
        "--results-md",
        type=Path,
        default=None,
        help="markdown report (default benchmarks/RESULTS.md; not written in --smoke)",
    )
    p.add_argument("--repeat", type=int, default=None, help="repeats of the matrix")
    p.add_argument("--messages", type=int, default=None, help="messages per run (all sizes)")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of paths")
    p.add_argument(
        "--cells",
        default=None,
        help="comma-separated subset of cells, e.g. 1k-20s-reuse,50k-100s-perconn",
    )
    p.add_argument("--scale", type=int, default=None, help="messages queued in the scale runs")
    p.add_argument("--no-scale", action="store_true", help="skip the scale runs")
    p.add_argument("--no-client-check", action="store_true", help="skip the smtp-source runs")
    p.add_argument("--no-install", action="store_true", help="never run apt-get")
    p.add_argument("--sink", choices=["auto", "smtp-sink", "pysink"], default="auto")
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="extra smtpbalancer config, e.g. --set server.workers=2",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="parent of the temporary work directory (spools, queues; a real disk)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="FILE",
        help="measure nothing: re-render the table, chart and RESULTS.md from a result file",
    )
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run smtpbalancer from the working tree itself, not from a copy taken at start",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.repeat is not None:
        mode = _replace(mode, repeat=max(1, args.repeat))
    if args.messages is not None:
        mode = _replace(mode, messages={s: args.messages for s in mode.sizes})
    if args.scale is not None:
        batch = max(10, min(mode.scale_batch, args.scale // 5 or 10))
        mode = _replace(mode, scale_total=args.scale, scale_batch=batch)

    if args.from_json is not None:
        write_outputs(json.loads(args.from_json.read_text()), args, HERE / "RESULTS.md")
        return 0

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    notes = [] if mode.name == "smoke" else ensure_packages(not args.no_install)
    wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(wanted) - set(PATHS)
    if unknown:
        raise SystemExit(f"unknown path(s): {', '.join(sorted(unknown))}")
    paths, skipped = available_paths(wanted)
    sink_kind = args.sink
    if sink_kind == "auto":
        sink_kind = "smtp-sink" if peers.which("smtp-sink") else "pysink"
    elif sink_kind == "smtp-sink" and peers.which("smtp-sink") is None:
        raise SystemExit("--sink smtp-sink: smtp-sink is not installed (package postfix)")
    client_check = not args.no_client_check and mode.name != "smoke"
    if client_check and peers.which("smtp-source") is None:
        client_check = False
        notes.append("client check skipped: smtp-source is not installed (package postfix)")

    work_parent = args.work_dir or Path(tempfile.gettempdir())
    work_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="smtpbench-", dir=work_parent))
    work.chmod(0o755)  # Postfix's unprivileged daemons must reach their queue below it
    ctx = Context(args, mode, work, sink_kind)
    ctx.probe = hostprobe.HostProbe(work / "hostprobe.txt")
    ctx.probe.start()
    code_sha = None
    if not args.no_snapshot:
        ctx.code, code_sha = snapshot_code(work / "code")
        where = _imported_from(ctx.code, work)
        if not where.startswith(str(ctx.code)):
            raise SystemExit(f"the snapshot of smtpbalancer is not what gets imported: {where}")
    for path, why in skipped.items():
        say(f"skipping {path}: {why}")
    for note in notes:
        say(note)
    result: dict[str, Any] = {
        "suite": {
            "mode": mode.name,
            "command": " ".join(["benchmarks/suite.py", *(argv or sys.argv[1:])]),
            "repeat": mode.repeat,
            "messages": {str(k): v for k, v in mode.messages.items()},
            "cells": [c.slug for c in mode.cells()],
            "paths": paths,
            "client": "benchmarks/loadgen.py (raw SMTP on non-blocking sockets + uvloop, no "
            "pipelining; latency to each reply's arrival, by the kernel's receive stamp)",
            "sink": sink_kind,
            "smtpbalancer_overrides": ctx.overrides,
            "smtpbalancer_config": peers.Smtpbalancer(work, ctx.overrides).config([0, 0]),
        },
        "machine": machine(work),
        "versions": {
            "postfix": peers.Postfix.version(),
            "haproxy": peers.HAProxy.version(),
            "smtpbalancer": _smtpbalancer_version(ctx.code, work),
            "smtpbalancer_snapshot_sha256": code_sha,
        },
        "skipped": skipped,
        "notes": notes,
        "runs": [],
        "client_check": [],
        "scale": None,
    }
    interrupted = False
    try:
        cells = mode.cells()
        if args.cells:
            chosen = {c.strip() for c in args.cells.split(",")}
            cells = [c for c in cells if c.slug in chosen]
        for r in range(mode.repeat):
            for cell in cells:
                n = mode.messages[cell.size]
                say(f"[repeat {r + 1}/{mode.repeat}] {cell.slug}: {n} messages")
                for path in paths:
                    row = run_path(ctx, path, cell, n, r)
                    show_row(row)
                    result["runs"].append(row)
        if client_check:
            cell = Cell(1024, 20, True)
            n = mode.messages[1024]
            say(f"[client check] smtp-source -d -s 20, {n} messages")
            for path in paths:
                row = run_path(ctx, path, cell, n, 0, client="smtp-source")
                show_row(row)
                result["client_check"].append(row)
        if mode.scale_total and not args.no_scale and "smtpbalancer" in paths:
            say(f"[scale] smtpbalancer with {mode.scale_total} queued")
            result["scale"] = scale_run(ctx, mode.scale_total, mode.scale_batch)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: every process this run started has been stopped")
    finally:
        ctx.probe.stop()
        result["host"] = host_summary(ctx.probe.samples())
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"work directory kept: {work}")

    result["failures"] = ctx.failures
    if interrupted:
        # Partial figures must not replace the latest complete ones.
        report.finish(result)
        args.out.mkdir(parents=True, exist_ok=True)
        partial = args.out / "interrupted.json"
        partial.write_text(json.dumps(result, indent=1) + "\n")
        say(f"interrupted: partial results in {partial}")
        return 130
    write_outputs(result, args, md_default=None if mode.name == "smoke" else HERE / "RESULTS.md")
    return 1 if ctx.failures else 0


def host_summary(samples: list[hostprobe.Sample]) -> dict[str, Any] | None:
    """The probe over the whole suite: its usual cost, and how much of the time was slow."""
    if len(samples) < 2:
        return None
    found = hostprobe.windows(samples)
    span = samples[-1].at - samples[0].at
    return {
        "samples": len(samples),
        "median_cpu_us": statistics.median(s.cpu_us for s in samples),
        "windows": len(found),
        "slow_share": round(sum(w.end - w.start for w in found) / max(span, 1e-9), 4),
        "longest_ms": round(max((w.ms for w in found), default=0.0), 1),
        "every_s": round(span / len(found), 2) if found else None,
        "slow_factor": hostprobe.SLOW_FACTOR,
    }


def write_outputs(
    result: dict[str, Any], args: argparse.Namespace, md_default: Path | None
) -> None:
    """Summary and targets into `result`; OUT/latest.json, OUT/latest.png, RESULTS.md, a table."""
    report.finish(result)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "latest.json"
    json_path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    chart = report.chart(result, args.out / "latest.png")
    md_path = args.results_md or md_default
    if md_path is not None:
        md_path.write_text(report.markdown(result, chart_name=_relative(chart, md_path)))
    report.print_tables(result)
    say(f"wrote {json_path}" + (f", {chart}" if chart else " (no chart: matplotlib missing)")
        + (f", {md_path}" if md_path else ""))  # fmt: skip


def _replace(mode: Mode, **changes: Any) -> Mode:
    from dataclasses import replace

    return replace(mode, **changes)


def _relative(path: Path | None, md: Path) -> str | None:
    if path is None:
        return None
    try:
        return os.path.relpath(path, md.parent)
    except ValueError:
        return str(path)


def snapshot_code(dest: Path) -> tuple[Path, str]:
    """Copy the smtpbalancer package as it is now, so every run of this suite measures the
    same code even while the working tree changes; returns (directory, content hash)."""
    import hashlib

    shutil.copytree(
        REPO / "smtpbalancer", dest / "smtpbalancer",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )  # fmt: skip
    digest = hashlib.sha256()
    for f in sorted((dest / "smtpbalancer").rglob("*")):
        if f.is_file():
            digest.update(str(f.relative_to(dest)).encode() + b"\0" + f.read_bytes())
    return dest, digest.hexdigest()[:16]


def _smtpbalancer_version(code: Path | None, cwd: Path) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "smtpbalancer", "version"], capture_output=True, text=True,
        timeout=30, check=False, env=peers.serve_env(code), cwd=cwd,
    )  # fmt: skip
    return res.stdout.strip().removeprefix("smtpbalancer ") or "?"


def _imported_from(code: Path | None, cwd: Path) -> str:
    """Where `python -m smtpbalancer` finds the package, run the way the suite runs it."""
    res = subprocess.run(
        [sys.executable, "-c", "import smtpbalancer; print(smtpbalancer.__file__)"],
        capture_output=True, text=True, timeout=30, check=False, env=peers.serve_env(code),
        cwd=cwd,
    )  # fmt: skip
    return res.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
