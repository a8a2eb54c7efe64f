"""Summaries, targets and the three renderings of a suite result: markdown, chart, terminal.

Ratios are taken within one repeat (smtpbalancer's run and Postfix's run of the same
cell, minutes apart) and then summarised as median [min-max] over the repeats: on a
shared machine absolute figures drift between repeats more than the ratios do.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

PATH_ORDER = ("direct", "haproxy", "postfix", "smtpbalancer")
PATH_LABEL = {
    "direct": "(a) direct",
    "haproxy": "(b) HAProxy",
    "postfix": "(c) Postfix",
    "smtpbalancer": "(d) smtpbalancer",
}
COLORS = {
    "direct": "#888888",
    "haproxy": "#4c72b0",
    "postfix": "#dd8452",
    "smtpbalancer": "#55a868",
}

Row = dict[str, Any]


def cell_key(row: Row) -> tuple[int, int, bool]:
    return (int(row["size"]), int(row["sessions"]), bool(row["reuse"]))


def cell_label(key: tuple[int, int, bool]) -> str:
    size, sessions, reuse = key
    return f"{size // 1024} KiB, {sessions} sess, {'reuse' if reuse else '1 msg/conn'}"


def _stats(values: list[float | None]) -> dict[str, float] | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _ok(row: Row) -> bool:
    return "error" not in row


def summarize(runs: list[Row]) -> list[Row]:
    """One row per (cell, path): medians and ranges over repeats, ratios within repeats."""
    by: dict[tuple[tuple[int, int, bool], str], list[Row]] = {}
    for row in runs:
        if _ok(row):
            by.setdefault((cell_key(row), row["path"]), []).append(row)
    index = {(cell_key(r), r["path"], r["repeat"]): r for r in runs if _ok(r)}

    def ratio(row: Row, other: str, metric: str) -> float | None:
        base = index.get((cell_key(row), other, row["repeat"]))
        if base is None or not row.get(metric) or not base.get(metric):
            return None
        return float(row[metric]) / float(base[metric])

    out: list[Row] = []
    cells = sorted({k for k, _p in by}, key=lambda k: (k[0], k[1], not k[2]))
    for key in cells:
        for path in PATH_ORDER:
            rows = by.get((key, path))
            if not rows:
                continue
            out.append(
                {
                    "size": key[0], "sessions": key[1], "reuse": key[2], "path": path,
                    "repeats": len(rows),
                    "complete": all(r["complete"] for r in rows),
                    "accept_rate": _stats([r["accept_rate"] for r in rows]),
                    "e2e_rate": _stats([r["e2e_rate"] for r in rows]),
                    "p50_ms": _stats([r["p50_ms"] for r in rows]),
                    "p99_ms": _stats([r["p99_ms"] for r in rows]),
                    "p99_read_ms": _stats([r.get("p99_read_ms") for r in rows]),
                    "host_slow_ms": _stats([r.get("host_slow_ms") for r in rows]),
                    "p99_outside_host_ms": _stats([r.get("p99_outside_host_ms") for r in rows]),
                    "cpu_s_per_1000": _stats([r["cpu_s_per_1000"] for r in rows]),
                    "peak_rss_mb": _stats([r["peak_rss_mb"] for r in rows]),
                    "peak_pss_mb": _stats([r.get("peak_pss_mb") for r in rows]),
                    "e2e_vs_postfix": _stats([ratio(r, "postfix", "e2e_rate") for r in rows]),
                    "e2e_vs_direct": _stats([ratio(r, "direct", "e2e_rate") for r in rows]),
                    "accept_vs_postfix": _stats(
                        [ratio(r, "postfix", "accept_rate") for r in rows]
                    ),
                    "cpu_vs_postfix": _stats(
                        [ratio(r, "postfix", "cpu_s_per_1000") for r in rows]
                    ),
                }
            )  # fmt: skip
    return out


def _find(summary: list[Row], path: str, key: tuple[int, int, bool]) -> Row | None:
    for row in summary:
        if row["path"] == path and cell_key(row) == key:
            return row
    return None


def _med(row: Row | None, metric: str) -> float | None:
    if row is None or row.get(metric) is None:
        return None
    return float(row[metric]["median"])


def targets(result: Row) -> list[Row]:
    summary: list[Row] = result["summary"]
    out: list[Row] = []
    head = (1024, 20, True)
    sb, pf = _find(summary, "smtpbalancer", head), _find(summary, "postfix", head)
    r = sb["e2e_vs_postfix"] if sb else None
    out.append(
        {
            "name": "End-to-end throughput ≥ 3x Postfix relay (1 KiB, 20 sessions, reuse)",
            "measured": _fmt_pair(_med(sb, "e2e_rate"), _med(pf, "e2e_rate"), "msg/s"),
            "ratio": r,
            "met": None if r is None else r["median"] >= 3.0,
        }
    )
    r = sb["cpu_vs_postfix"] if sb else None
    out.append(
        {
            "name": "CPU per relayed message ≤ 25% of Postfix's (1 KiB, 20 sessions, reuse)",
            # CPU seconds per 1000 messages == CPU milliseconds per message
            "measured": _fmt_pair(
                _med(sb, "cpu_s_per_1000"), _med(pf, "cpu_s_per_1000"), "ms CPU/msg"
            ),
            "ratio": r,
            "met": None if r is None else r["median"] <= 0.25,
        }
    )  # fmt: skip
    lat = _find(summary, "smtpbalancer", (1024, 100, True))
    p99 = _med(lat, "p99_ms")
    worst = max(
        (
            (float(s["p99_ms"]["median"]), cell_label(cell_key(s)))
            for s in summary
            if s["path"] == "smtpbalancer" and s["sessions"] == 100 and s["p99_ms"]
        ),
        default=None,
    )
    read = _med(lat, "p99_read_ms")
    detail = f" ({read:.1f} ms as the load generator read the replies)" if read else ""
    detail += f"; worst 100-session cell: {worst[0]:.1f} ms ({worst[1]})" if worst else ""
    detail += _host_detail(result, (1024, 100, True))
    out.append(
        {
            "name": "p99 accept latency ≤ 20 ms at 100 sessions (1 KiB, reuse)",
            "measured": (f"{p99:.1f} ms" if p99 is not None else "n/a") + detail,
            "ratio": _single(p99, 20.0),
            "met": None if p99 is None else p99 <= 20.0,
        }
    )
    sc = result.get("scale") or {}
    queued = sc.get("queued_measured", sc.get("queued"))
    rss_values = [v for v in (sc.get("rss_queued_mb"), sc.get("rss_restarted_mb")) if v]
    rss = max(rss_values) if rss_values else None
    out.append(
        {
            "name": "100k queued: RSS ≤ 200 MB",
            "measured": f"{rss:.0f} MB" if rss is not None else "n/a",
            "ratio": _single(rss, 200.0),
            "met": None if rss is None else rss <= 200.0,
        }
    )
    rs = sc.get("restart_s")
    out.append(
        {
            "name": "100k queued: restart to accepting ≤ 5 s",
            "measured": f"{rs:.2f} s" if rs is not None else "n/a",
            "ratio": _single(rs, 5.0),
            "met": None if rs is None else rs <= 5.0,
        }
    )
    fit = sc.get("accept_fit")
    paired = sc.get("paired")
    ar = paired["ratio"] if paired else fit["ratio"] if fit else sc.get("accept_ratio")
    if paired:
        n = len(paired["pairs"])
        spread = f" ({paired['ratio_min']:.2f}-{paired['ratio_max']:.2f})" if n > 1 else ""
        line = f"; line through the growing series: x{fit['ratio']:.2f}" if fit else ""
        measured = (
            f"{n} interleaved batch pairs against a fresh instance: {paired['full_rate']:,.0f} "
            f"msg/s with {paired['full_queued_min']:,}+ queued vs {paired['empty_rate']:,.0f} "
            f"with at most {paired['empty_queued_max']:,}; per-pair ratio x{paired['ratio']:.2f}"
            f"{spread}{line}"
        )
    elif fit:
        measured = (
            f"least-squares line over {fit['batches']} batches: {fit['at_max']:,.0f} msg/s at "
            f"{fit['max_queued']:,} queued vs {fit['at_0']:,.0f} at 0 "
            f"(single batches: {sc['accept_full_rate']:,.0f} vs {sc['accept_empty_rate']:,.0f}, "
            f"x{sc['accept_ratio']:.2f})"
        )
    elif ar is not None:
        measured = f"{sc['accept_full_rate']:,.0f} vs {sc['accept_empty_rate']:,.0f} msg/s"
    else:
        measured = "n/a"
    out.append(
        {
            "name": "100k queued: accept rate within 10% of the empty-queue rate",
            "measured": measured,
            "ratio": _single(ar, 1.0),
            "met": None if ar is None else ar >= 0.9,
        }
    )
    if queued is not None:
        for t in out[3:]:
            t["note"] = f"measured with {queued:,} queued" + (
                "" if queued >= 100_000 else ", not 100k"
            )
    return out


def _host_detail(result: Row, key: tuple[int, int, bool]) -> str:
    """How the host probe explains a cell's p99 (smtpbalancer's runs), for the target row."""
    runs = [
        r for r in result["runs"]
        if _ok(r) and r["path"] == "smtpbalancer" and cell_key(r) == key
        and r.get("host_slow_ms") is not None
    ]  # fmt: skip
    if not runs:
        return ""
    hit = [r for r in runs if r["host_slow_ms"] > 0]
    clear = [r["p99_outside_host_ms"] for r in runs if r.get("p99_outside_host_ms") is not None]
    text = f"; host slow windows during {len(hit)} of {len(runs)} repeats"
    if hit:
        text += " (" + ", ".join(f"{r['host_slow_ms']:.0f} ms" for r in hit) + ")"
    if clear:
        text += f"; p99 of the messages not in flight in one: {statistics.median(clear):.1f} ms"
    return text


def _host_section(result: Row, key: tuple[int, int, bool]) -> list[str]:
    """Per repeat, for the p99 target's cell: each path's p99 beside the host's slow time."""
    runs = sorted(
        (r for r in result["runs"] if _ok(r) and cell_key(r) == key and "host_slow_ms" in r),
        key=lambda r: (r["repeat"], PATH_ORDER.index(r["path"])),
    )
    if not runs:
        return []
    lines = [
        "",
        "## Host slowdowns and the p99",
        "",
        f"{cell_label(key)}, every repeat. *host slow*: time of the client's run inside the "
        "probe's slow windows (hostprobe.py), and the probe's worst slowdown in them. The "
        "messages in flight during a window all wait for it, so when a run holds one, its "
        "p99 is about that window. *p99 of the others*: the same run without the messages "
        "in flight during a window, to tell the host's share of the tail from ours; the "
        "target is judged on the p99 itself. *p99 as read*: to when the load generator read "
        "each reply rather than when it arrived, its own delays included.",
        "",
        "| repeat | path | p99 ms | p99 as read ms | host slow ms (slowdown) "
        "| messages in a window | p99 of the others ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        slow = f"{r['host_slow_ms']:.0f}"
        if r.get("host_slowdown"):
            slow += f" (x{r['host_slowdown']:.0f})"
        p99, clear, read = r.get("p99_ms"), r.get("p99_outside_host_ms"), r.get("p99_read_ms")
        lines.append(
            f"| {r['repeat'] + 1} | {PATH_LABEL[r['path']]} | "
            f"{'-' if p99 is None else format(p99, '.1f')} | "
            f"{'-' if read is None else format(read, '.1f')} | {slow} | "
            f"{r.get('in_host_windows', '-')} | {'-' if clear is None else format(clear, '.1f')} |"
        )
    return lines


def _fmt_pair(a: float | None, b: float | None, unit: str) -> str:
    fa = f"{a:,.2f}" if a is not None and a < 10 else f"{a:,.0f}" if a is not None else "n/a"
    fb = f"{b:,.2f}" if b is not None and b < 10 else f"{b:,.0f}" if b is not None else "n/a"
    return f"{fa} vs Postfix {fb} {unit}"


def _single(value: float | None, ref: float) -> dict[str, float] | None:
    if value is None:
        return None
    v = value / ref
    return {"median": v, "min": v, "max": v, "n": 1}


def accept_fit(scale: Row) -> Row | None:
    """A least-squares line through (queued, accept rate) of the scale batches.

    One batch against another is at the mercy of the machine's noise (±20% here); the line
    through all of them says whether the rate falls as the queue grows, which is the
    question (O(1) per message or not)."""
    pts = scale.get("series") or []
    if len(pts) < 3:
        return None
    xs = [float(p["queued_before"]) for p in pts]
    ys = [float(p["rate"]) for p in pts]
    slope, intercept = statistics.linear_regression(xs, ys)
    at_0 = intercept
    at_max = intercept + slope * max(xs)
    if at_0 <= 0:
        return None
    return {
        "batches": len(pts),
        "max_queued": int(max(xs)),
        "at_0": round(at_0, 1),
        "at_max": round(at_max, 1),
        "ratio": round(at_max / at_0, 3),
        "slope_per_10k_queued": round(slope * 10_000, 1),
    }


def finish(result: Row) -> None:
    result["summary"] = summarize(result["runs"])
    if result.get("scale"):
        result["scale"]["accept_fit"] = accept_fit(result["scale"])
    result["targets"] = targets(result)


# ---------------------------------------------------------------------- formatting


def fmt_rate(s: dict[str, float] | None) -> str:
    if not s:
        return "-"
    if s["n"] > 1 and s["max"] > s["min"]:
        return f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"
    return f"{s['median']:,.0f}"


def fmt_num(s: dict[str, float] | None, digits: int = 1) -> str:
    if not s:
        return "-"
    return f"{s['median']:.{digits}f}"


def fmt_ratio(s: dict[str, float] | None) -> str:
    if not s:
        return "-"
    if s["n"] > 1 and s["max"] > s["min"]:
        return f"x{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
    return f"x{s['median']:.2f}"


def _met(t: Row) -> str:
    return "-" if t["met"] is None else ("yes" if t["met"] else "**no**")


def markdown(result: Row, chart_name: str | None) -> str:
    m, suite = result["machine"], result["suite"]
    v = result["versions"]
    lines = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/suite.py` — do not edit by hand; rerun it (see "
        "[README.md](README.md)). Absolute figures drift on a shared machine: compare the "
        "ratios, which are taken within one repeat.",
        "",
        f"- **Run:** {m['date']}, mode `{suite['mode']}`, {suite['repeat']} repeat(s), "
        f"messages per run: "
        + ", ".join(f"{int(k) // 1024} KiB → {n:,}" for k, n in suite["messages"].items())
        + f"; command `{suite['command']}`",
        f"- **Machine:** {m['cpu']}, {m['cpus']} CPU(s) ({m['cpus_usable']} usable), "
        f"{m['memory']} RAM; {m['os']}, kernel {m['kernel']}; Python {m['python']}; "
        f"work directory on {m['work_dir_filesystem']}; load average at start "
        f"{', '.join(str(x) for x in m['loadavg_at_start'])}",
        f"- **Code:** smtpbalancer {v['smtpbalancer']} at git {m['git']}"
        + (
            f" (a copy taken at start, sha256 {v['smtpbalancer_snapshot_sha256']})"
            if v.get("smtpbalancer_snapshot_sha256")
            else ""
        )
        + (
            f" with `{' '.join('--set ' + o for o in suite['smtpbalancer_overrides'])}`"
            if suite["smtpbalancer_overrides"]
            else ""
        )
        + f"; Postfix {v['postfix'] or '-'}; HAProxy {v['haproxy'] or '-'}",
        f"- **Client / sink:** {suite['client']}; sink `{suite['sink']}` (the same for every path)",
    ]
    other = [r["other_load_cores"] for r in result["runs"] if r.get("other_load_cores") is not None]
    if other:
        lines.append(
            f"- **Other load during the runs:** median {statistics.median(other):.2f} of "
            f"{m['cpus']} cores busy outside the benchmark's own processes (max {max(other):.2f}; "
            "`other_load_cores` per run in the JSON)"
        )
    host = result.get("host")
    if host:
        every = f", one every {host['every_s']:.1f} s" if host["every_s"] else ""
        lines.append(
            f"- **Host slowdowns:** a probe process (`hostprobe.py`) timed the same small piece "
            f"of work every 5 ms for the whole suite (median {host['median_cpu_us']:.0f} us of "
            f"CPU); it took ≥{host['slow_factor']:.0f}x that in {host['windows']} windows"
            f"{every}, the longest {host['longest_ms']:.0f} ms, "
            f"{host['slow_share'] * 100:.1f}% of the time. These slow every process at once "
            "and do not show as load: see *Host slowdowns and the p99* below"
        )
    for path, why in result["skipped"].items():
        lines.append(f"- **Skipped {path}:** {why}")
    for note in result["notes"]:
        lines.append(f"- **Note:** {note}")
    for failure in result.get("failures", []):
        lines.append(f"- **Failure:** {failure}")
    lines += [
        "",
        "## Targets (issue 6)",
        "",
        "| target | measured | ratio | met |",
        "|---|---|---|---|",
    ]
    for t in result["targets"]:
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(
            f"| {t['name']}{note} | {t['measured']} | {fmt_ratio(t['ratio'])} | {_met(t)} |"
        )
    lines += [
        "",
        "## Four paths, same run",
        "",
        "Median over the repeats, (min-max) when they differ. *accepted*: messages / time from "
        "the first connection to the last `250`. *end to end*: until the sinks counted every "
        "accepted message and the path's queue is empty. Latency: end of DATA → final reply, "
        "as it arrived at the client's socket (the kernel's receive time). "
        "CPU and memory: the path's own processes (none for direct; the sink and the client "
        "are not counted); RSS is the sum of each process's peak (VmHWM), PSS the largest "
        "sampled sum of proportional set sizes (shared pages counted once). Ratios: within "
        "each repeat, to Postfix and to direct.",
        "",
        "| cell | path | accepted msg/s | end-to-end msg/s | p50 ms | p99 ms | CPU s / 1000 msg "
        "| peak RSS MB | PSS MB | e2e x Postfix | e2e x direct | CPU x Postfix |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    last = None
    for s in result["summary"]:
        key = cell_key(s)
        label = cell_label(key) if key != last else ""
        last = key
        flag = "" if s["complete"] else " ⚠ incomplete"
        lines.append(
            f"| {label} | {PATH_LABEL[s['path']]}{flag} | {fmt_rate(s['accept_rate'])} | "
            f"{fmt_rate(s['e2e_rate'])} | {fmt_num(s['p50_ms'])} | {fmt_num(s['p99_ms'])} | "
            f"{fmt_num(s['cpu_s_per_1000'], 2)} | {fmt_num(s['peak_rss_mb'], 0)} | "
            f"{fmt_num(s.get('peak_pss_mb'), 0)} | {fmt_ratio(s['e2e_vs_postfix'])} | "
            f"{fmt_ratio(s['e2e_vs_direct'])} | {fmt_ratio(s['cpu_vs_postfix'])} |"
        )
    if result["client_check"]:
        lines += [
            "",
            "## Client check: Postfix's smtp-source on the same paths",
            "",
            "`smtp-source -d -s 20` (1 KiB, 20 sessions, reuse; C, no latency figures), to check "
            "that the Python load generator is not what limits a path.",
            "",
            "| path | smtp-source accepted msg/s | smtp-source e2e msg/s | loadgen e2e msg/s "
            "(same cell, repeat 1) |",
            "|---|---|---|---|",
        ]
        ref = {
            r["path"]: r
            for r in result["runs"]
            if _ok(r) and r["repeat"] == 0 and cell_key(r) == (1024, 20, True)
        }
        for r in result["client_check"]:
            if not _ok(r):
                lines.append(f"| {PATH_LABEL[r['path']]} | failed | | |")
                continue
            lg = ref.get(r["path"], {}).get("e2e_rate")
            lines.append(
                f"| {PATH_LABEL[r['path']]} | {r['accept_rate']:,.0f} | "
                f"{(r['e2e_rate'] or 0):,.0f} | {f'{lg:,.0f}' if lg else '-'} |"
            )
    lines += _host_section(result, (1024, 100, True))
    sc = result.get("scale")
    if sc:
        lines += ["", "## Scale runs (smtpbalancer)", ""]
        if "error" in sc:
            lines.append(f"Failed: `{sc['error'].splitlines()[0]}`")
        lines += [
            "The relays are down while the queue fills, so nothing leaves the spool; after a "
            f"warm-up of {sc.get('warmup', {}).get('messages', 0):,} messages, each "
            f"measurement sends {sc['batch']:,} messages of 1 KiB over 20 reused sessions, "
            "and the last one starts with the target count already queued. Restart times are "
            "from exec to the first EHLO answered `250` on a fresh connection. RSS and restart "
            f"are taken with {sc.get('queued_measured', sc.get('queued', 0)):,} queued; the "
            "interleaved pairs come after the restart, and recovery drains everything, "
            f"{sc.get('queued', 0):,} messages.",
            "",
            "| figure | value |",
            "|---|---|",
        ]
        rows = [
            (
                f"accept rate, empty queue (after the warm-up: "
                f"{(sc.get('series') or [{}])[0].get('queued_before', 0):,} queued)",
                sc.get("accept_empty_rate"),
                "{:,.0f} msg/s",
            ),
            (
                f"accept rate with {sc.get('accept_full_queued', 0):,} queued",
                sc.get("accept_full_rate"),
                "{:,.0f} msg/s",
            ),
            ("ratio full / empty (these two batches)", sc.get("accept_ratio"), "x{:.2f}"),
            (
                "ratio, interleaved pairs against a fresh instance (median)",
                (sc.get("paired") or {}).get("ratio"),
                "x{:.2f}",
            ),
            (
                "ratio from a line through all batches",
                (sc.get("accept_fit") or {}).get("ratio"),
                "x{:.2f}",
            ),
            ("RSS with the queue full (before restart)", sc.get("rss_queued_mb"), "{:.0f} MB"),
            ("RSS after a restart with it queued", sc.get("rss_restarted_mb"), "{:.0f} MB"),
            ("PSS after a restart with it queued", sc.get("pss_restarted_mb"), "{:.0f} MB"),
            ("graceful stop with it queued", sc.get("stop_s"), "{:.2f} s"),
            ("restart: exec → EHLO answered 250", sc.get("restart_s"), "{:.2f} s"),
            ("restart: exec → /metrics shows the whole queue", sc.get("restart_metrics_s"),
             "{:.2f} s"),
            ("recovery: exec with relays up → all delivered", sc.get("recovery_s"), "{:.1f} s"),
            ("recovery throughput", sc.get("recovery_rate"), "{:,.0f} msg/s"),
            ("recovery CPU", sc.get("recovery_cpu_s_per_1000"), "{:.2f} s / 1000 msg"),
            ("peak RSS while draining", sc.get("recovery_peak_rss_mb"), "{:.0f} MB"),
        ]  # fmt: skip
        for name, value, fmt in rows:
            lines.append(f"| {name} | {fmt.format(value) if value is not None else '-'} |")
        if sc.get("paired"):
            lines += [
                "",
                "Interleaved pairs (the full instance and a fresh one with an empty spool, both "
                "with relays down, the same batch each, alternating which goes first): "
                + "; ".join(
                    f"{p['full']['rate']:,.0f} msg/s with {p['full']['queued_before']:,} queued"
                    f" vs {p['empty']['rate']:,.0f} with {p['empty']['queued_before']:,}"
                    f" (x{p['ratio']:.2f})"
                    for p in sc["paired"]["pairs"]
                )
                + ".",
            ]
        if sc.get("series"):
            lines += [
                "",
                "Accept rate as the queue grows: "
                + ", ".join(f"{p['queued_before']:,} → {p['rate']:,.0f}" for p in sc["series"])
                + " msg/s.",
            ]
    if chart_name:
        lines += ["", f"![four paths]({chart_name})"]
    lines.append("")
    return "\n".join(lines)


def chart(result: Row, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summary: list[Row] = result["summary"]
    if not summary:
        return None
    cells = []
    for s in summary:
        if cell_key(s) not in cells:
            cells.append(cell_key(s))
    paths = [p for p in PATH_ORDER if any(s["path"] == p for s in summary)]
    panels = [
        ("accepted msg/s", "accept_rate", True),
        ("end-to-end msg/s", "e2e_rate", True),
        ("CPU ms per message (path's own processes)", "cpu_s_per_1000", False),
        ("p99 accept latency, ms", "p99_ms", True),
    ]
    sc = result.get("scale") or {}
    fig, axes = plt.subplots(3 if sc.get("series") else 2, 2, figsize=(13, 11 if sc else 8))
    width = 0.8 / max(1, len(paths))
    xs = range(len(cells))
    for ax, (title, metric, log) in zip(axes.flat, panels, strict=False):
        for i, p in enumerate(paths):
            vals, lo, hi = [], [], []
            for key in cells:
                row = _find(summary, p, key)
                st = row.get(metric) if row else None
                med = st["median"] if st else 0.0
                vals.append(med)
                lo.append(med - st["min"] if st else 0.0)
                hi.append(st["max"] - med if st else 0.0)
            ax.bar([x + (i - (len(paths) - 1) / 2) * width for x in xs], vals, width,
                   yerr=[lo, hi], capsize=2, label=PATH_LABEL[p], color=COLORS[p])  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([cell_label(k).replace(", ", "\n") for k in cells], fontsize=7)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    if sc.get("series"):
        ax = axes.flat[4]
        pts = sc["series"]
        ax.plot([p["queued_before"] for p in pts], [p["rate"] for p in pts], "o-",
                color=COLORS["smtpbalancer"])  # fmt: skip
        fit = sc.get("accept_fit")
        if fit:
            ax.plot([0, fit["max_queued"]], [fit["at_0"], fit["at_max"]], "--",
                    color="black", lw=0.8, label=f"least squares: x{fit['ratio']:.2f}")  # fmt: skip
            ax.legend(fontsize=8)
        ax.set_title("smtpbalancer accept msg/s vs messages already queued", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax = axes.flat[5]
        rss = max(sc.get("rss_queued_mb") or 0, sc.get("rss_restarted_mb") or 0)
        ratio = (
            (sc.get("paired") or {}).get("ratio")
            or (sc.get("accept_fit") or {}).get("ratio")
            or sc.get("accept_ratio")
            or 0
        )
        bars = [
            (f"restart {sc.get('restart_s') or 0:.2f} s\n(limit 5 s)",
             (sc.get("restart_s") or 0) / 5.0),
            (f"RSS {rss:.0f} MB\n(limit 200 MB)", rss / 200.0),
            (f"accept full/empty x{ratio:.2f}\n(limit ≥ 0.9)", 0.9 / max(ratio, 1e-9)),
        ]  # fmt: skip
        ax.barh([b[0] for b in bars], [b[1] for b in bars], color=COLORS["smtpbalancer"])
        ax.axvline(1.0, color="red", lw=0.8, ls="--")
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(
            f"scale ({sc.get('queued_measured', sc.get('queued', 0)):,} queued): share of each "
            "limit, ≤ 1 is met; "
            f"recovery {sc.get('recovery_rate') or 0:,.0f} msg/s",
            fontsize=9,
        )
    m = result["machine"]
    fig.suptitle(
        f"smtpbalancer benchmark suite, {result['suite']['mode']} mode, {m['date']} — "
        f"{m['cpus']} CPU {m['cpu']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def print_tables(result: Row) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    t = Table(title="Four paths, same run (median over repeats; ratios within a repeat)")
    for col in ("cell", "path", "accept/s", "e2e/s", "p50 ms", "p99 ms", "CPU s/1k", "RSS MB",
                "PSS MB", "e2e xPostfix", "e2e xdirect", "CPU xPostfix"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("cell", "path") else "right")
    last = None
    for s in result["summary"]:
        key = cell_key(s)
        t.add_row(
            cell_label(key) if key != last else "",
            PATH_LABEL[s["path"]] + ("" if s["complete"] else " ⚠"),
            fmt_rate(s["accept_rate"]), fmt_rate(s["e2e_rate"]), fmt_num(s["p50_ms"]),
            fmt_num(s["p99_ms"]), fmt_num(s["cpu_s_per_1000"], 2), fmt_num(s["peak_rss_mb"], 0),
            fmt_num(s.get("peak_pss_mb"), 0), fmt_ratio(s["e2e_vs_postfix"]),
            fmt_ratio(s["e2e_vs_direct"]), fmt_ratio(s["cpu_vs_postfix"]),
        )  # fmt: skip
        last = key
    console.print(t)
    tt = Table(title="Targets (issue 6)")
    for col in ("target", "measured", "ratio", "met"):
        tt.add_column(col)
    for target in result["targets"]:
        tt.add_row(
            target["name"] + (f" ({target['note']})" if target.get("note") else ""),
            target["measured"], fmt_ratio(target["ratio"]),
            "-" if target["met"] is None else ("yes" if target["met"] else "NO"),
        )  # fmt: skip
    console.print(tt)
    for path, why in result["skipped"].items():
        console.print(f"skipped {path}: {why}")
    for failure in result.get("failures", []):
        console.print(f"[red]failure:[/red] {failure}")
