"""Occupancy of the segment log: when to reclaim, compact or rotate. Plain numbers."""

from __future__ import annotations

from smtpbalancer.spool.occupancy import Action, Occupancy


def table() -> Occupancy:
    return Occupancy(compact_below=0.25, compact_min_bytes=1000, idle_rotate_bytes=500)


def test_a_left_segment_is_reclaimed_when_its_last_record_finishes() -> None:
    occ = table()
    occ.switch(1)
    occ.add(1, 0, 100)
    occ.add(1, 100, 100)
    assert occ.switch(2) == (1, Action.NONE)  # left with live records
    assert occ.remove(1, 100) is Action.NONE  # 100 of 200 live: not sparse (and small)
    assert occ.remove(1, 100) is Action.RECLAIM
    assert len(occ) == 0 and occ.live(1) == 0


def test_a_segment_the_writer_leaves_empty_is_reclaimed_at_once() -> None:
    occ = table()
    occ.switch(1)
    occ.add(1, 0, 100)
    assert occ.remove(1, 100) is Action.NONE  # still the open segment
    assert occ.switch(2) == (1, Action.RECLAIM)


def test_the_open_segment_rotates_once_drained_and_big_enough() -> None:
    occ = table()
    occ.switch(1)
    occ.add(1, 0, 400)
    assert occ.remove(1, 400) is Action.NONE  # 400 bytes: below idle_rotate_bytes
    occ.add(1, 400, 200)
    assert occ.remove(1, 200) is Action.ROTATE


def test_a_sparse_left_segment_is_compacted() -> None:
    occ = table()
    occ.switch(1)
    for i in range(10):
        occ.add(1, i * 200, 200)  # 2000 bytes
    occ.switch(2)
    verdicts = [occ.remove(1, 200) for _ in range(8)]
    # 2000 -> 400 live: compact once under 500 (a quarter), and again on each later removal
    assert verdicts == [Action.NONE] * 7 + [Action.COMPACT]
    assert occ.remove(1, 200) is Action.COMPACT
    assert occ.remove(1, 200) is Action.RECLAIM


def test_small_segments_are_not_worth_compacting() -> None:
    occ = table()
    occ.switch(1)
    for i in range(4):
        occ.add(1, i * 200, 200)  # 800 bytes < compact_min_bytes
    occ.switch(2)
    assert [occ.remove(1, 200) for _ in range(3)] == [Action.NONE] * 3


def test_recovery_sizes_a_segment_past_its_last_live_record() -> None:
    occ = table()
    occ.add(1, 0, 100)
    occ.add(1, 1800, 200)  # the last live record
    assert occ.sized(1, 4000) is Action.COMPACT  # the scan saw 4000 bytes: 300 live
    occ.add(2, 0, 900)
    assert occ.sized(2, 1000) is Action.NONE
    assert occ.sized(3, 1000) is Action.NONE  # nothing live there: not tracked
