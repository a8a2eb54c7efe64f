"""The benchmark suite in its CI smoke mode: it runs, relays everything, writes its JSON.

Not a timed test: nothing here depends on how fast the machine is. It fails when the
suite breaks or when smtpbalancer loses (or duplicates) a message on the way to the sinks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "suite.py"


def test_smoke_run_relays_every_message_through_smtpbalancer(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert proc.returncode == 0, f"suite failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    result: dict[str, Any] = json.loads((tmp_path / "latest.json").read_text())
    assert result["suite"]["mode"] == "smoke"
    assert result["failures"] == []

    runs = [r for r in result["runs"] if r["path"] == "smtpbalancer"]
    assert runs, f"no smtpbalancer runs: {result['skipped']}"
    for run in runs:
        assert "error" not in run, run.get("error")
        assert run["accepted"] == run["messages"] > 0, run
        assert run["rejected"] == 0 and run["errors"] == 0, run
        assert run["sink_count"] == run["accepted"], run  # nothing lost, nothing twice
        assert run["complete"] is True
        assert run["e2e_rate"] is not None and run["e2e_rate"] > 0
        assert run["cpu_s_per_1000"] is not None and run["peak_rss_mb"] > 0
        # a reply arrives before the load generator reads it: the kernel's stamp is earlier
        assert 0 < run["p99_ms"] <= run["p99_read_ms"], run
        # the host probe watched the run: its slow time, and the p99 without those messages
        assert run["host_slow_ms"] >= 0 and run["host_windows"] >= 0, run
        assert run["p99_outside_host_ms"] is not None or run["in_host_windows"] == run["accepted"]

    host = result["host"]  # the probe ran for the whole suite
    assert host is not None and host["samples"] > 100 and host["median_cpu_us"] > 0, host

    direct = [r for r in result["runs"] if r["path"] == "direct"]
    assert direct and all(r["sink_count"] == r["accepted"] == r["messages"] for r in direct)

    scale = result["scale"]
    assert scale is not None and "error" not in scale, scale
    assert scale["recovery_complete"] is True
    assert scale["recovery_sink_count"] == scale["queued"] > 0
    assert scale["restart_s"] > 0
    # The interleaved comparison (after the RSS and restart figures): the same batch against
    # the full and a fresh instance; its batches count in `queued`, which recovery drains.
    pairs = scale["paired"]["pairs"]
    assert len(pairs) == 1 and scale["paired"]["ratio"] > 0
    assert scale["queued_measured"] + scale["paired"]["full_accepted"] == scale["queued"]
    for pair in pairs:
        assert pair["full"]["accepted"] == pair["empty"]["accepted"] == scale["batch"], pair
        assert pair["full"]["queued_before"] > pair["empty"]["queued_before"], pair
    assert {t["name"] for t in result["targets"]}  # the target table is always produced


def test_revisions_script_measures_a_revision_as_the_suite_does() -> None:
    script = SUITE.with_name("revisions.py")
    proc = subprocess.run(
        [sys.executable, str(script), "HEAD", "--messages", "30", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"revisions.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "x1.00" in line]
    assert len(rows) == 1, proc.stdout
