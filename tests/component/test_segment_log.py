"""The spool's segment log on a real disk: group commit, reclaim, recovery, failures.

Syscalls are counted with wrappers that call through to the real `os` functions (or
fail like the kernel would, for the fault cases); the file system is never mocked.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpbalancer.clock import SystemClock
from smtpbalancer.envelope import Envelope
from smtpbalancer.errors import SpoolCorrupt, SpoolError
from smtpbalancer.spool import record, recovery, segment
from smtpbalancer.spool import store as store_module
from smtpbalancer.spool.record import MessageMeta, Progress
from smtpbalancer.spool.sidecar import write_file
from smtpbalancer.spool.store import LEGACY, SpoolStore

ENV = Envelope("esp@sender.test", ("r@rcpt.test",))


def body_of(i: int, size: int = 1024) -> bytes:
    return (b"Subject: %d\r\n\r\n" % i).ljust(size, b"x")


def opened(spool: Path, **kwargs: Any) -> tuple[SpoolStore, recovery.Recovered]:
    store = SpoolStore(spool, SystemClock(), **kwargs)
    store.open()
    return store, recovery.scan(store)


def logs(spool: Path) -> list[str]:
    return sorted(p.name for p in (spool / "segments").iterdir())


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def ids(found: recovery.Recovered) -> list[str]:
    return [meta.queue_id for meta, _ in found.messages]


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every fdatasync the process makes, by fd (the real call still runs)."""
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    yield calls


def fail_once(
    monkeypatch: pytest.MonkeyPatch, name: str, err: int, *, partial: bool = False
) -> None:
    """The next os.<name> call fails with `err` (after writing part of it, if `partial`)."""
    real: Callable[..., Any] = getattr(os, name)
    state = {"armed": True}

    def failing(fd: int, *args: Any) -> Any:
        if not state["armed"]:
            return real(fd, *args)
        state["armed"] = False
        if partial:  # like a disk that fills up half-way through the batch
            buffers, offset = args
            os.pwrite(fd, bytes(buffers[0])[:10] + bytes(buffers[1])[:100], offset)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, name, failing)


# --- group commit ---------------------------------------------------------------------


async def test_concurrent_stores_share_one_fdatasync(tmp_path: Path, syncs: list[int]) -> None:
    store, _ = opened(tmp_path)
    metas = await asyncio.gather(*(store.store(ENV, body_of(i)) for i in range(20)))
    assert len(syncs) == 1, "20 stores arriving together are one batch"
    assert store.messages == 20 and store.bytes == 20 * 1024
    assert [await store.load_body(m) for m in metas] == [body_of(i) for i in range(20)]
    store.close()


async def test_arrivals_during_a_sync_form_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = opened(tmp_path, commit_on_loop_under_s=None)  # a slow disk: on the thread
    real = os.fdatasync
    syncing, go_on = threading.Event(), threading.Event()
    batches: list[int] = []

    def slow(fd: int) -> None:  # a slow disk: everything arriving meanwhile waits
        batches.append(store.messages)
        syncing.set()
        assert go_on.wait(5), "the loop was blocked: the sync ran on it"
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    first = asyncio.gather(*(store.store(ENV, body_of(i)) for i in range(5)))
    while not syncing.is_set():
        await asyncio.sleep(0.001)
    second = asyncio.gather(*(store.store(ENV, body_of(i)) for i in range(5, 30)))
    await asyncio.sleep(0.01)
    go_on.set()
    await asyncio.gather(first, second)
    assert batches == [0, 5]  # two fdatasyncs: 5 records, then the 25 that came meanwhile
    assert store.messages == 30
    store.close()


async def test_a_store_returns_only_after_its_batch_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = opened(tmp_path)
    events: list[str] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        real(fd)
        events.append("fdatasync")

    monkeypatch.setattr(os, "fdatasync", recording)

    async def one(i: int) -> None:
        await store.store(ENV, body_of(i))
        events.append("stored")

    await asyncio.gather(*(one(i) for i in range(3)))
    assert events == ["fdatasync", "stored", "stored", "stored"]
    store.close()


async def test_batches_are_capped(tmp_path: Path, syncs: list[int]) -> None:
    store, _ = opened(tmp_path)
    await asyncio.gather(*(store.store(ENV, b"x" * 100) for i in range(600)))
    assert len(syncs) == 3  # 256 + 256 + 88 records
    big = b"y" * (store_module.BATCH_BYTES // 2 + 1)
    syncs.clear()
    await asyncio.gather(*(store.store(ENV, big) for i in range(3)))
    assert len(syncs) == 3  # by bytes: one record each
    store.close()


# --- reclaim ----------------------------------------------------------------------------


async def test_fully_done_segments_are_unlinked_once_left(tmp_path: Path) -> None:
    store, _ = opened(tmp_path, rotate_bytes=4096)
    metas = [await store.store(ENV, body_of(i, 1500)) for i in range(8)]
    assert len(logs(tmp_path)) == 3  # rotation after 4 KiB: 3 records a segment
    for meta in metas[:3]:
        await store.remove(meta)
    assert logs(tmp_path) == ["0000000002.log", "0000000003.log"]
    for meta in metas[3:5]:
        await store.remove(meta)
    assert logs(tmp_path) == ["0000000002.done", "0000000002.log", "0000000003.log"]
    for meta in metas[5:]:
        await store.remove(meta)
    # The open segment stays until the writer leaves it (it is small: no early rotation).
    assert logs(tmp_path) == ["0000000003.done", "0000000003.log"]
    assert store.messages == 0 and store.bytes == 0 and store.oldest_arrival() is None
    store.close()
    assert logs(tmp_path) == []


async def test_an_open_segment_all_done_is_replaced_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "IDLE_ROTATE_BYTES", 2000)
    store, _ = opened(tmp_path)
    metas = [await store.store(ENV, body_of(i)) for i in range(3)]
    for meta in metas:
        await store.remove(meta)
    assert logs(tmp_path) == ["0000000001.done", "0000000001.log"]
    await store.store(ENV, body_of(9))
    await wait_for(lambda: logs(tmp_path) == ["0000000002.log"])  # reclaimed in a thread
    store.close()


# --- restart ----------------------------------------------------------------------------


async def test_done_marks_are_honoured_after_a_restart(tmp_path: Path) -> None:
    store, _ = opened(tmp_path)
    metas = [await store.store(ENV, body_of(i)) for i in range(3)]
    await store.remove(metas[1])
    await store.save_progress(metas[2].queue_id, Progress(attempts=2))
    store.close()

    store, found = opened(tmp_path)
    assert ids(found) == [metas[0].queue_id, metas[2].queue_id]
    assert found.messages[1][1] == Progress(attempts=2)
    assert [await store.load_body(m) for m, _ in found.messages] == [body_of(0), body_of(2)]
    assert store.messages == 2
    await store.store(ENV, body_of(3))
    assert logs(tmp_path)[-1] == "0000000002.log", "a new run appends to a new segment"
    store.close()


async def test_torn_tail_is_cut_and_later_appends_follow_good_data(tmp_path: Path) -> None:
    store, _ = opened(tmp_path)
    metas = [await store.store(ENV, body_of(i)) for i in range(3)]
    store.close()
    path = segment.log_path(tmp_path / "segments", 1)
    good = path.stat().st_size
    prefix, _ = record.encode_message(MessageMeta("0" * 20, ENV, 1.0, 5000), b"z" * 5000)
    append(path, prefix + b"z" * 1000)  # a record cut short by a crash

    store, found = opened(tmp_path)
    assert ids(found) == [m.queue_id for m in metas]
    assert path.stat().st_size == good
    assert list((tmp_path / "quarantine").iterdir()) == []
    late = await store.store(ENV, body_of(7))
    store.close()
    store, found = opened(tmp_path)
    assert ids(found) == [*(m.queue_id for m in metas), late.queue_id]
    store.close()


@pytest.mark.parametrize("tail", [b"SMTPB1 12", b"\0" * 5000])
async def test_a_cut_off_header_or_zeros_is_a_torn_tail(tmp_path: Path, tail: bytes) -> None:
    store, _ = opened(tmp_path)
    await store.store(ENV, body_of(0))
    store.close()
    path = segment.log_path(tmp_path / "segments", 1)
    append(path, tail)
    store, found = opened(tmp_path)
    assert len(found.messages) == 1 and found.quarantined == 0
    store.close()


async def test_a_corrupt_record_in_the_middle_is_quarantined_and_the_rest_recovered(
    tmp_path: Path,
) -> None:
    store, _ = opened(tmp_path)
    metas = [await store.store(ENV, body_of(i)) for i in range(3)]
    bad = store.location(metas[1].queue_id)
    assert bad is not None and bad.seq == 1
    store.close()
    path = segment.log_path(tmp_path / "segments", 1)
    data = bytearray(path.read_bytes())
    data[bad.offset + bad.head_len - 5] ^= 0x01  # inside the metadata JSON
    path.write_bytes(bytes(data))

    store, found = opened(tmp_path)
    assert ids(found) == [metas[0].queue_id, metas[2].queue_id]
    assert found.quarantined == 1
    aside = tmp_path / "quarantine" / f"0000000001.log@{bad.offset}"
    length = bad.head_len + 1024
    assert aside.read_bytes() == bytes(data[bad.offset : bad.offset + length])
    store.close()
    store, found = opened(tmp_path)  # set aside once, not at every start
    assert (len(found.messages), found.quarantined) == (2, 0)
    store.close()


async def test_an_unframeable_middle_quarantines_the_rest_of_the_segment(tmp_path: Path) -> None:
    store, _ = opened(tmp_path)
    metas = [await store.store(ENV, body_of(i)) for i in range(3)]
    bad = store.location(metas[1].queue_id)
    assert bad is not None
    store.close()
    path = segment.log_path(tmp_path / "segments", 1)
    data = bytearray(path.read_bytes())
    data[bad.offset : bad.offset + 6] = b"GARBGE"  # the header line itself
    path.write_bytes(bytes(data))

    store, found = opened(tmp_path)
    assert ids(found) == [metas[0].queue_id]  # no search for the next "SMTPB1"
    assert found.quarantined == 1
    aside = tmp_path / "quarantine" / f"0000000001.log@{bad.offset}"
    assert aside.read_bytes() == bytes(data[bad.offset :])
    assert path.stat().st_size == bad.offset
    store.close()


async def test_a_corrupt_body_is_quarantined_when_loaded(tmp_path: Path) -> None:
    store, _ = opened(tmp_path)
    meta = await store.store(ENV, body_of(0))
    slot = store.location(meta.queue_id)
    assert slot is not None
    path = segment.log_path(tmp_path / "segments", 1)
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"!", slot.offset + slot.head_len + 100)
    os.close(fd)
    with pytest.raises(SpoolCorrupt):
        await store.load_body(meta)
    await store.quarantine(meta, "body checksum mismatch")
    assert store.messages == 0
    assert (tmp_path / "quarantine" / meta.queue_id).stat().st_size == slot.head_len + 1024
    store.close()
    store, found = opened(tmp_path)
    assert found.messages == [] and logs(tmp_path) == []
    store.close()


async def test_legacy_message_files_are_recovered_delivered_and_removed(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir(parents=True)
    legacy = MessageMeta("0197A1B2C3D4E5F60718", ENV, 1_750_000_000.0, 1024)
    prefix, crc = record.encode_message(legacy, body_of(0))
    write_file(queue / legacy.queue_id, (prefix, body_of(0)))
    write_file(queue / f"{legacy.queue_id}.state", (record.encode_progress(Progress(attempts=1)),))

    store, found = opened(tmp_path)
    fresh = await store.store(ENV, body_of(1))
    [(meta, progress)] = found.messages
    assert (meta.queue_id, meta.body_crc, progress.attempts) == (legacy.queue_id, crc, 1)
    assert store.location(meta.queue_id).seq == LEGACY  # type: ignore[union-attr]
    assert store.oldest_arrival() == 1_750_000_000.0
    assert await store.load_body(meta) == body_of(0)
    await store.remove(meta)
    assert sorted(p.name for p in queue.iterdir()) == []
    await store.remove(fresh)
    store.close()
    store, found = opened(tmp_path)
    assert found.messages == []
    store.close()


# --- failures ---------------------------------------------------------------------------


async def test_a_failed_fdatasync_fails_the_batch_and_its_records_never_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = opened(tmp_path)
    kept = await store.store(ENV, body_of(0))
    fail_once(monkeypatch, "fdatasync", errno.EIO)
    outcomes = await asyncio.gather(
        *(store.store(ENV, body_of(i)) for i in range(1, 4)), return_exceptions=True
    )
    assert all(isinstance(o, SpoolError) and o.errno == errno.EIO for o in outcomes)
    assert store.messages == 1
    later = await store.store(ENV, body_of(9))
    assert store.location(later.queue_id).seq == 2  # type: ignore[union-attr]
    store.close()

    store, found = opened(tmp_path)
    assert ids(found) == [kept.queue_id, later.queue_id]
    store.close()


async def test_a_failed_fdatasync_in_a_new_segment_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = opened(tmp_path)
    fail_once(monkeypatch, "fdatasync", errno.EIO)
    with pytest.raises(SpoolError):
        await store.store(ENV, body_of(0))
    assert logs(tmp_path) == []
    store.close()


async def test_a_failed_write_is_cut_back_and_the_next_store_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = opened(tmp_path)
    kept = await store.store(ENV, body_of(0))
    size = segment.log_path(tmp_path / "segments", 1).stat().st_size
    fail_once(monkeypatch, "pwritev", errno.ENOSPC, partial=True)
    with pytest.raises(SpoolError) as failed:
        await store.store(ENV, body_of(1))
    assert failed.value.errno == errno.ENOSPC
    assert segment.log_path(tmp_path / "segments", 1).stat().st_size == size
    later = await store.store(ENV, body_of(2))
    assert store.location(later.queue_id).seq == 2  # type: ignore[union-attr]
    store.close()
    store, found = opened(tmp_path)
    assert ids(found) == [kept.queue_id, later.queue_id]
    store.close()


async def test_short_writes_are_continued_until_the_batch_is_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwritev
    calls: list[int] = []

    def short(fd: int, buffers: Any, offset: int) -> int:  # the kernel may stop anywhere
        data = b"".join(bytes(b) for b in buffers)[:700]
        calls.append(len(data))
        return real(fd, [data], offset)

    store, _ = opened(tmp_path)
    monkeypatch.setattr(os, "pwritev", short)
    metas = await asyncio.gather(*(store.store(ENV, body_of(i)) for i in range(5)))
    monkeypatch.setattr(os, "pwritev", real)
    assert len(calls) > 5, "one batch, written 700 bytes at a time"
    assert [await store.load_body(m) for m in metas] == [body_of(i) for i in range(5)]
    store.close()
    store, found = opened(tmp_path)
    assert ids(found) == [m.queue_id for m in metas]
    store.close()


async def test_a_cancelled_store_is_still_accounted(tmp_path: Path) -> None:
    store, _ = opened(tmp_path)
    task = asyncio.ensure_future(store.store(ENV, body_of(0)))
    await asyncio.sleep(0)
    task.cancel()
    await wait_for(lambda: store.messages == 1)  # written, so counted (delivered after a restart)
    store.close()


# --- operator actions ---------------------------------------------------------------------


async def test_hold_release_and_delete_online(tmp_path: Path) -> None:
    store, _ = opened(tmp_path)
    meta = await store.store(ENV, body_of(0))
    other = await store.store(ENV, body_of(1))
    marker = tmp_path / "queue" / f"{meta.queue_id}.hold"
    assert await store.hold(meta.queue_id) is True and marker.exists()
    assert await store.release(meta.queue_id) is True and not marker.exists()
    assert await store.hold(meta.queue_id) is True
    assert await store.hold("0" * 20) is False
    assert await store.release("0" * 20) is False
    assert await store.delete("0" * 20) is None

    assert await store.delete(meta.queue_id) == meta
    assert (store.messages, store.bytes) == (1, 1024)
    assert not marker.exists()
    assert meta.queue_id in segment.read_done(segment.done_path(tmp_path / "segments", 1)).ids
    assert await store.delete(meta.queue_id) is None
    with pytest.raises(FileNotFoundError):
        await store.load_body(meta)
    await store.remove(meta)  # a late removal by the dispatcher changes nothing
    assert store.messages == 1
    store.close()
    store, found = opened(tmp_path)
    assert ids(found) == [other.queue_id]
    store.close()


async def test_a_held_message_is_recovered_as_held(tmp_path: Path) -> None:
    store, _ = opened(tmp_path)
    meta = await store.store(ENV, body_of(0))
    await store.hold(meta.queue_id)
    store.close()
    store, found = opened(tmp_path)
    assert found.messages == [] and [m.queue_id for m, _ in found.held] == [meta.queue_id]
    assert store.messages == 1
    store.close()


# --- readers of a running instance's spool ------------------------------------------------


async def test_listing_tolerates_a_torn_tail_and_a_vanishing_segment(tmp_path: Path) -> None:
    store, _ = opened(tmp_path, rotate_bytes=1000)
    metas = [await store.store(ENV, body_of(i, 1500)) for i in range(3)]  # one a segment
    view = SpoolStore(tmp_path, SystemClock())  # no lock: what `queue list` uses
    active = segment.log_path(tmp_path / "segments", 3)
    append(active, b"SMTPB1 100 1500 0000")  # a batch half-written right now
    listed = recovery.listing(view)
    first = next(listed)
    segment.log_path(tmp_path / "segments", 2).unlink()  # reclaimed meanwhile
    rest = list(listed)
    assert [first.name, *(e.name for e in rest)] == [metas[0].queue_id, metas[2].queue_id]
    assert all(e.problem == "" for e in rest)
    view.close()
    store.close()


# --- compaction -------------------------------------------------------------------------


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments worth compacting from 8 KiB on (a real spool: from 1 MiB)."""
    monkeypatch.setattr(store_module, "IDLE_ROTATE_BYTES", 8 * 1024)


async def test_a_sparse_segment_is_compacted_and_reclaimed(
    tmp_path: Path, small_segments: None
) -> None:
    store, _ = opened(tmp_path, rotate_bytes=16 * 1024)
    metas = [await store.store(ENV, body_of(i)) for i in range(40)]
    first = [m for m in metas if store.location(m.queue_id).seq == 1]  # type: ignore[union-attr]
    straggler, *done = first
    for meta in done:  # all but one finished: segment 1 is 1/14 live
        await store.remove(meta)
    await wait_for(lambda: "0000000001.log" not in logs(tmp_path))
    moved, newest = store.location(straggler.queue_id), store.location(metas[-1].queue_id)
    assert moved is not None and newest is not None
    assert moved.seq == newest.seq == 3 and store.relocated >= 1  # into the open segment
    assert await store.load_body(straggler) == body_of(0)
    assert (store.messages, store.bytes) == (40 - len(done), (40 - len(done)) * 1024)
    assert store.oldest_arrival() == straggler.received_wall  # the order is kept
    store.close()

    store, found = opened(tmp_path)
    assert ids(found)[0] == straggler.queue_id and len(found.messages) == 40 - len(done)
    store.close()


async def test_a_crash_between_copy_and_mark_keeps_the_older_copy(
    tmp_path: Path, small_segments: None
) -> None:
    store, _ = opened(tmp_path, rotate_bytes=16 * 1024)
    metas = [await store.store(ENV, body_of(i)) for i in range(40)]
    first = [m for m in metas if store.location(m.queue_id).seq == 1]  # type: ignore[union-attr]
    old_log = segment.log_path(tmp_path / "segments", 1)
    before = old_log.read_bytes()
    for meta in first[1:]:
        await store.remove(meta)
    await wait_for(lambda: not old_log.exists())
    store.close()
    # As if the old segment's reclaim and marks never reached the disk: both copies live.
    old_log.write_bytes(before)
    segment.done_path(tmp_path / "segments", 1).write_text(
        "".join(f"{m.queue_id}\n" for m in first[1:])
    )

    store, found = opened(tmp_path)
    assert sorted(ids(found)) == sorted(m.queue_id for m in metas if m not in first[1:])
    kept = store.location(first[0].queue_id)
    assert kept is not None and kept.seq == 1
    assert await store.load_body(first[0]) == body_of(0)
    # The newer copy is marked done for good: finishing the older one cannot revive it.
    await store.remove(first[0])
    store.close()
    store, found = opened(tmp_path)
    assert first[0].queue_id not in ids(found)
    store.close()


async def test_a_sparse_segment_found_at_start_is_compacted_once_the_store_runs(
    tmp_path: Path, small_segments: None
) -> None:
    store, _ = opened(tmp_path, rotate_bytes=16 * 1024)
    metas = [await store.store(ENV, body_of(i)) for i in range(40)]
    first = [m for m in metas if store.location(m.queue_id).seq == 1]  # type: ignore[union-attr]
    store.close()
    marks = segment.done_path(tmp_path / "segments", 1)
    segment.append_done(marks, [m.queue_id for m in first[1:]], durable=False)

    store, found = opened(tmp_path)
    assert len(found.messages) == 40 - len(first) + 1
    await store.store(ENV, body_of(99))
    await wait_for(lambda: "0000000001.log" not in logs(tmp_path))
    assert store.location(first[0].queue_id).seq == 4  # type: ignore[union-attr]
    store.close()


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
