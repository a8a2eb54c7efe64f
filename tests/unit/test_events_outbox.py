"""The durable outbox on real files: group commit, order, restart, torn tails, reclaim, bound."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from support.waiting import wait_until

from smtpbalancer.clock import SystemClock
from smtpbalancer.events.outbox import Outbox, OutboxError

Factory = Callable[..., Outbox]


@pytest.fixture
async def outboxes(tmp_path: Path) -> AsyncIterator[Factory]:
    """`outboxes(name=…, **kw)` opens an Outbox on tmp_path/"events"; closed at teardown."""
    opened: list[Outbox] = []

    def make(name: str = "t", **kw: object) -> Outbox:
        box = Outbox(tmp_path / "events", SystemClock(), name=name, **kw)  # type: ignore[arg-type]
        box.open()
        opened.append(box)
        return box

    yield make
    for box in opened:
        await box.drain()
        box.close()


def _docs(first: int, count: int) -> list[dict[str, object]]:
    return [{"n": n, "status": "delivered"} for n in range(first, first + count)]


def _ns(docs: tuple[bytes, ...]) -> list[int]:
    return [json.loads(d)["n"] for d in docs]


async def _read_all(box: Outbox, limit: int = 1000) -> list[int]:
    """Read and mark sent until nothing is left; the n of every event, in order."""
    out: list[int] = []
    while (batch := await box.read(limit)) is not None:
        out += _ns(batch.docs)
        await box.mark_sent(batch)
    return out


def _logs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.log"))


def _metric(name: str, outbox: str) -> float:
    return REGISTRY.get_sample_value(name, {"outbox": outbox}) or 0.0


async def test_events_come_back_in_append_order_with_unique_ids(outboxes: Factory) -> None:
    box = outboxes("order")
    await asyncio.gather(*(box.append(_docs(i * 10, 10)) for i in range(5)))
    await box.append(_docs(50, 7))
    assert box.pending == 57
    batch = await box.read(20)
    assert batch is not None and len(batch.docs) == 20
    assert _ns(batch.docs) == sorted(_ns(batch.docs))  # each append's events stay together
    await box.mark_sent(batch)
    assert box.pending == 37
    rest = await _read_all(box, limit=100)
    assert sorted(_ns(batch.docs) + rest) == list(range(57))
    assert rest[-7:] == list(range(50, 57))  # the later append comes after all the others
    assert box.pending == 0 and await box.read(10) is None


async def test_concurrent_appends_share_one_fdatasync(
    outboxes: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = outboxes("group")
    real = os.fdatasync
    calls: list[int] = []
    gate = threading.Event()

    def held_fdatasync(fd: int) -> None:
        calls.append(fd)
        gate.wait(10)  # the first batch is "on the disk" until released
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held_fdatasync)
    first = asyncio.ensure_future(box.append(_docs(0, 1)))
    await wait_until(lambda: len(calls) == 1)
    rest = [asyncio.ensure_future(box.append(_docs(n, 1))) for n in range(1, 51)]
    await wait_until(lambda: "queued=50" in repr(box))
    assert not first.done()  # returns only once its fdatasync is over
    gate.set()
    await asyncio.gather(first, *rest)
    assert len(calls) == 2  # one for the first append, one for the 50 that queued meanwhile
    assert box.pending == 51


async def test_unsent_events_and_the_cursor_survive_a_restart(
    tmp_path: Path, outboxes: Factory
) -> None:
    box = outboxes("restart")
    await box.append(_docs(0, 10))
    batch = await box.read(4)
    assert batch is not None
    await box.mark_sent(batch)
    await box.drain()
    box.close()

    again = outboxes("restart")  # a new object on the same directory, as after a restart
    assert again.pending == 6
    assert await _read_all(again) == list(range(4, 10))


async def test_a_torn_tail_is_ignored_on_reopen(
    tmp_path: Path, outboxes: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    box = outboxes("torn")
    await box.append(_docs(0, 3))
    box.close()
    [name] = _logs(tmp_path / "events")
    whole = (tmp_path / "events" / name).read_bytes()
    half = whole.splitlines(keepends=True)[0][:30]  # half a record: a crash mid-write
    (tmp_path / "events" / name).write_bytes(whole + half)

    with caplog.at_level(logging.WARNING):
        again = outboxes("torn")
    assert "events.torn_tail outbox=torn" in caplog.text and f"bytes={len(half)}" in caplog.text
    assert again.pending == 3
    await again.append(_docs(3, 2))  # goes to a new segment, never after the torn bytes
    assert len(_logs(tmp_path / "events")) == 2
    assert await _read_all(again) == [0, 1, 2, 3, 4]


async def test_a_damaged_record_is_skipped_and_the_rest_delivered(
    tmp_path: Path, outboxes: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    box = outboxes("damaged")
    await box.append(_docs(0, 5))
    box.close()
    [name] = _logs(tmp_path / "events")
    path = tmp_path / "events" / name
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"n":2', b'"n":7')  # bit rot: the checksum no longer matches
    path.write_bytes(b"".join(lines))

    with caplog.at_level(logging.ERROR):
        again = outboxes("damaged")
    assert "events.damaged outbox=damaged" in caplog.text
    assert again.pending == 4
    assert await _read_all(again) == [0, 1, 3, 4]


async def test_sent_segments_are_removed(tmp_path: Path, outboxes: Factory) -> None:
    box = outboxes("reclaim", segment_bytes=300)
    for n in range(40):
        await box.append(_docs(n, 1))
    files = len(_logs(tmp_path / "events"))
    assert files >= 8
    sent: list[int] = []
    while len(sent) < 20:  # a batch never spans segments
        batch = await box.read(20 - len(sent))
        assert batch is not None
        sent += _ns(batch.docs)
        await box.mark_sent(batch)
    assert len(_logs(tmp_path / "events")) <= files - 3  # the sent ones went at once
    assert sent + await _read_all(box) == list(range(40))
    assert len(_logs(tmp_path / "events")) <= 1  # at most the segment still open
    box.close()
    assert _logs(tmp_path / "events") == []
    assert outboxes("reclaim").pending == 0


async def test_a_full_outbox_drops_the_oldest_and_counts_them(
    tmp_path: Path, outboxes: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    before = _metric("smtpbalancer_events_dropped_total", "full")
    box = outboxes("full", max_bytes=4096, segment_bytes=1024)
    with caplog.at_level(logging.ERROR):
        for n in range(200):  # ~16 KiB of events into 4 KiB
            await box.append(_docs(n, 1))
    assert box.dropped > 100
    assert box.dropped + box.pending == 200
    assert _metric("smtpbalancer_events_dropped_total", "full") - before == box.dropped
    assert _metric("smtpbalancer_events_pending", "full") == box.pending
    on_disk = sum(p.stat().st_size for p in (tmp_path / "events").glob("*.log"))
    assert on_disk <= 4096
    assert "events.dropped outbox=full" in caplog.text
    assert len([r for r in caplog.records if "events.dropped" in r.msg]) <= 2  # not per event
    survivors = await _read_all(box)
    assert survivors == list(range(200 - len(survivors), 200))  # the newest, in order


async def test_a_batch_whose_segment_was_dropped_meanwhile_is_harmless(outboxes: Factory) -> None:
    box = outboxes("stale", max_bytes=4096, segment_bytes=1024)
    await box.append(_docs(0, 5))
    batch = await box.read(5)
    assert batch is not None
    for n in range(5, 100):
        await box.append(_docs(n, 1))
    pending = box.pending
    await box.mark_sent(batch)  # its segment is gone: nothing else moves
    assert box.pending == pending
    survivors = await _read_all(box)
    assert survivors[-1] == 99 and len(survivors) == pending


async def test_a_failed_fdatasync_fails_the_append_and_leaves_no_event(
    tmp_path: Path, outboxes: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = outboxes("eio")
    await box.append(_docs(0, 2))
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OutboxError) as info:
        await box.append(_docs(2, 3))
    assert info.value.errno == errno.EIO
    monkeypatch.setattr(os, "fdatasync", real)
    await box.append(_docs(5, 1))  # a fresh segment: the failed one is not written again
    assert box.pending == 3
    box.close()
    assert await _read_all(outboxes("eio")) == [0, 1, 5]


async def test_one_directory_one_outbox(outboxes: Factory) -> None:
    box = outboxes("lock")
    with pytest.raises(OutboxError, match="lock"):
        outboxes("lock")
    await box.drain()
    box.close()
    with pytest.raises(OutboxError, match="closed"):
        await box.append(_docs(0, 1))


async def test_unencodable_events_are_dropped_not_raised(outboxes: Factory) -> None:
    box = outboxes("refused")
    await box.append([{"n": 0}, {"n": object()}, {"n": 2}])
    assert box.dropped == 1
    assert await _read_all(box) == [0, 2]
