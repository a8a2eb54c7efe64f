"""benchmarks/hostprobe.py: which probe samples make a host slow window, and what it covers.

Pure logic over recorded samples (the probe process itself runs in the benchmark smoke
test): a window needs consecutive slow samples, and the suite's "p99 of the others"
drops exactly the messages whose time in flight overlaps one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
_PATH = _BENCHMARKS / "hostprobe.py"


@pytest.fixture(scope="module")
def hp() -> ModuleType:
    if str(_BENCHMARKS) not in sys.path:  # as suite.py has it: hostprobe imports peers
        sys.path.insert(0, str(_BENCHMARKS))
    spec = importlib.util.spec_from_file_location("hostprobe", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["hostprobe"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def series(hp: ModuleType, costs: list[int], every: float = 0.005) -> list[object]:
    """Samples every `every` seconds from t=0 with these CPU costs (us)."""
    return [hp.Sample(i * every, cost) for i, cost in enumerate(costs)]


def test_a_run_of_slow_samples_is_one_window_from_its_first_start_to_its_last_end(
    hp: ModuleType,
) -> None:
    samples = series(hp, [50] * 10 + [600, 500, 650] + [50] * 10)
    [window] = hp.windows(samples)
    assert window.start == pytest.approx(0.050)
    assert window.end == pytest.approx(0.060 + 650e-6)
    assert window.slowdown == 13.0  # the worst sample over the median (50 us)


def test_a_lone_slow_sample_is_not_a_window(hp: ModuleType) -> None:
    assert hp.windows(series(hp, [50] * 10 + [900] + [50] * 10)) == []


def test_slow_samples_further_apart_than_the_merge_gap_are_separate_windows(
    hp: ModuleType,
) -> None:
    gap = int(hp.MERGE_GAP_S / 0.005) + 1  # fast samples between: just over the gap
    costs = [50] * 10 + [400, 400] + [50] * gap + [400, 400] + [50] * 10
    assert len(hp.windows(series(hp, costs))) == 2
    close = [50] * 10 + [400, 400, 50, 400, 400] + [50] * 10  # one fast sample between
    assert len(hp.windows(series(hp, close))) == 1


def test_samples_under_the_factor_make_no_window(hp: ModuleType) -> None:
    factor = hp.SLOW_FACTOR
    costs = [50] * 10 + [int(50 * factor) - 1] * 5 + [50] * 10
    assert hp.windows(series(hp, costs)) == []


def test_overlap_counts_only_the_part_of_a_window_inside_the_run(hp: ModuleType) -> None:
    found = [hp.Window(1.0, 1.1, 10.0), hp.Window(2.0, 2.05, 10.0)]
    assert hp.overlap_s(found, 1.05, 2.02) == pytest.approx(0.05 + 0.02)
    assert hp.overlap_s(found, 3.0, 4.0) == 0.0


def test_outside_keeps_the_messages_whose_flight_misses_every_window(hp: ModuleType) -> None:
    found = [hp.Window(1.0, 1.1, 10.0)]
    flights = [
        (0.90, 0.99),  # answered before the window
        (0.95, 1.01),  # in flight as it began
        (1.02, 1.05),  # inside it
        (1.09, 1.20),  # in flight as it ended
        (1.11, 1.15),  # after it
    ]
    assert hp.outside(found, flights) == [0, 4]


def test_the_probe_output_is_read_on_from_where_it_was_left(hp: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "probe.txt"
    probe = hp.HostProbe(out)
    out.write_text("1.000000 40\n1.005000 41\n1.0100")  # the last line is being written
    assert [s.cpu_us for s in probe.samples()] == [40, 41]
    with open(out, "a") as f:
        f.write("00 42\n")
    assert [(s.at, s.cpu_us) for s in probe.samples()] == [(1.0, 40), (1.005, 41), (1.01, 42)]
