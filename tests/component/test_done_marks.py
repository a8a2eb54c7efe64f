"""Done marks on a real disk: written on the loop, one write per segment per loop turn,
through an fd kept open, never outliving a reclaimed segment.

Syscalls are counted with wrappers that call through to the real `os` functions (or
fail like the kernel would); the file system is never mocked.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from smtpbalancer.clock import SystemClock
from smtpbalancer.envelope import Envelope
from smtpbalancer.errors import SpoolError
from smtpbalancer.spool import marks, recovery, segment
from smtpbalancer.spool import store as store_module
from smtpbalancer.spool.record import MessageMeta, Progress
from smtpbalancer.spool.store import SpoolStore

ENV = Envelope("esp@sender.test", ("r@rcpt.test",))
RECORD = 1500  # with rotate_bytes=4096: three records a segment


def opened(spool: Path, **kwargs: Any) -> SpoolStore:
    store = SpoolStore(spool, SystemClock(), **kwargs)
    store.open()
    recovery.scan(store)
    return store


async def stored(store: SpoolStore, n: int) -> list[MessageMeta]:
    return [await store.store(ENV, b"x" * RECORD) for _ in range(n)]


def seq_of(store: SpoolStore, meta: MessageMeta) -> int:
    slot = store.location(meta.queue_id)
    assert slot is not None
    return slot.seq


def done_ids(spool: Path, seq: int) -> list[str]:
    path = segment.done_path(spool / "segments", seq)
    return path.read_text().split() if path.exists() else []


def files(spool: Path) -> list[str]:
    return sorted(p.name for p in (spool / "segments").iterdir())


def open_done_files(spool: Path) -> list[str]:
    """What this process's open fds on the spool's .done files point at ("... (deleted)"
    once unlinked)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd listdir itself used, closed meanwhile
            continue
        if target.startswith(str(spool)) and ".done" in target:
            found.append(target)
    return found


def is_done_fd(fd: int) -> bool:
    try:
        return ".done" in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


@dataclass
class DoneSyscalls:
    """os.open and os.write calls on .done files: the path or fd, and the thread."""

    opens: list[str] = field(default_factory=list)
    writes: list[tuple[str, int]] = field(default_factory=list)  # (file name, thread ident)


@pytest.fixture
def done_calls(monkeypatch: pytest.MonkeyPatch) -> DoneSyscalls:
    calls = DoneSyscalls()
    real_open, real_write = os.open, os.write

    def opening(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(segment.DONE_SUFFIX):
            calls.opens.append(Path(path).name)
        return real_open(path, flags, *args, **kwargs)

    def writing(fd: int, data: Any) -> int:
        if is_done_fd(fd):
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            calls.writes.append((name, threading.get_ident()))
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "write", writing)
    return calls


# --- one write per segment per loop turn, on the loop --------------------------------------


async def test_the_marks_of_one_loop_turn_are_one_write_per_segment_on_the_loop(
    tmp_path: Path, done_calls: DoneSyscalls
) -> None:
    store = opened(tmp_path, rotate_bytes=4096)
    metas = await stored(store, 6)
    assert [seq_of(store, m) for m in metas] == [1, 1, 1, 2, 2, 2]
    finished = metas[0:2] + metas[3:5]  # none of them empties a segment

    await asyncio.gather(*(store.remove(m) for m in finished))

    loop_thread = threading.get_ident()
    assert sorted(done_calls.writes) == [
        ("0000000001.done", loop_thread),
        ("0000000002.done", loop_thread),
    ], "four marks, two segments: two writes, made on the loop, not on a thread"
    assert done_ids(tmp_path, 1) == [m.queue_id for m in metas[0:2]]
    assert done_ids(tmp_path, 2) == [m.queue_id for m in metas[3:5]]

    await store.remove(metas[5])  # a later turn appends through the fd kept open
    assert done_calls.writes[-1][0] == "0000000002.done" and len(done_calls.writes) == 3
    assert sorted(done_calls.opens) == ["0000000001.done", "0000000002.done"]
    store.close()
    assert open_done_files(tmp_path) == []


async def test_a_mark_is_on_disk_when_remove_returns(tmp_path: Path) -> None:
    store = opened(tmp_path)
    metas = await stored(store, 3)
    await store.remove(metas[1])
    assert done_ids(tmp_path, 1) == [metas[1].queue_id]
    store.close()

    store = opened(tmp_path)  # and it is honoured after a restart
    assert store.queue_ids() == {metas[0].queue_id, metas[2].queue_id}
    store.close()


async def test_a_cancelled_remove_keeps_its_mark_and_does_not_cancel_the_others(
    tmp_path: Path,
) -> None:
    store = opened(tmp_path)
    metas = await stored(store, 5)
    tasks = [asyncio.ensure_future(store.remove(m)) for m in metas]
    await asyncio.sleep(0)  # every remove has buffered its mark and waits
    tasks[0].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [None] * 4
    assert done_ids(tmp_path, 1) == [m.queue_id for m in metas]
    store.close()


async def test_open_done_files_are_bounded(tmp_path: Path, done_calls: DoneSyscalls) -> None:
    store = opened(tmp_path, rotate_bytes=2048)  # two records a segment
    metas = await stored(store, 2 * (marks.MAX_OPEN + 4))
    firsts = metas[::2]
    assert len({seq_of(store, m) for m in firsts}) == marks.MAX_OPEN + 4

    await asyncio.gather(*(store.remove(m) for m in firsts))

    assert len(done_calls.writes) == marks.MAX_OPEN + 4
    assert len(open_done_files(tmp_path)) == marks.MAX_OPEN, "the least recently used are closed"
    for first, live in zip(firsts, metas[1::2], strict=True):
        assert done_ids(tmp_path, seq_of(store, live)) == [first.queue_id]
    store.close()
    assert open_done_files(tmp_path) == []


# --- reclaim ----------------------------------------------------------------------------


async def test_a_reclaim_after_marks_leaves_no_done_file_and_no_fd_on_it(
    tmp_path: Path, done_calls: DoneSyscalls
) -> None:
    store = opened(tmp_path, rotate_bytes=4096)
    metas = await stored(store, 6)  # segments 1 and 2; the writer is on 2
    await store.remove(metas[0])  # segment 1's .done is open now
    assert done_ids(tmp_path, 1) == [metas[0].queue_id]
    # One turn: a plain mark for segment 1, a message with a .state file (the cleanup
    # thread's work), and the last one, which reclaims segment 1.
    await store.save_progress(metas[1].queue_id, Progress(attempts=1))
    await asyncio.gather(store.remove(metas[2]), store.remove(metas[1]))

    assert files(tmp_path) == ["0000000002.log"]
    assert open_done_files(tmp_path) == [], "no fd left on the unlinked .done"
    assert not (tmp_path / "queue" / f"{metas[1].queue_id}.state").exists()
    assert done_calls.opens.count("0000000001.done") == 1
    store.close()


async def test_a_segment_left_empty_is_reclaimed_after_its_marks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, done_calls: DoneSyscalls
) -> None:
    # The writer leaves a segment whose records are all done: _settle reclaims it.
    monkeypatch.setattr(store_module, "IDLE_ROTATE_BYTES", 2000)
    store = opened(tmp_path)
    metas = await stored(store, 2)
    await asyncio.gather(*(store.remove(m) for m in metas))  # the open segment idles: rotate
    await store.store(ENV, b"y" * RECORD)
    await wait_for(lambda: files(tmp_path) == ["0000000002.log"])
    assert open_done_files(tmp_path) == []
    store.close()


async def test_closing_a_drained_spool_leaves_nothing(tmp_path: Path) -> None:
    store = opened(tmp_path)
    metas = await stored(store, 3)
    removing = asyncio.gather(*(store.remove(m) for m in metas))
    await asyncio.sleep(0)  # the marks are buffered, their write is not made yet
    await asyncio.to_thread(store.close)  # as the app does: the loop keeps running
    await removing
    assert files(tmp_path) == []
    assert open_done_files(tmp_path) == []


async def test_a_remove_after_close_fails_like_any_spool_operation(tmp_path: Path) -> None:
    store = opened(tmp_path)
    metas = await stored(store, 2)
    store.close()
    with pytest.raises(SpoolError):
        await store.remove(metas[0])


# --- failures ---------------------------------------------------------------------------


async def test_a_mark_that_cannot_be_written_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = opened(tmp_path)
    metas = await stored(store, 3)
    segment.done_path(tmp_path / "segments", 1).mkdir()  # open() fails: EISDIR
    with caplog.at_level(logging.ERROR):
        await asyncio.gather(*(store.remove(m) for m in metas[:2]))
    failures = [r.getMessage() for r in caplog.records if "done_mark_failed" in r.getMessage()]
    assert failures == [f"spool.done_mark_failed segment=1 errno={errno.EISDIR}"]
    assert store.messages == 1
    store.close()


async def test_a_failed_write_is_logged_and_the_next_mark_reopens_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = opened(tmp_path)
    metas = await stored(store, 3)
    real = os.write
    armed = {"on": True}

    def full_disk(fd: int, data: Any) -> int:
        if armed["on"] and is_done_fd(fd):
            armed["on"] = False
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with caplog.at_level(logging.ERROR):
        await store.remove(metas[0])  # returns: the mark is lost, a redelivery at worst
    assert any(
        r.getMessage() == f"spool.done_mark_failed segment=1 errno={errno.ENOSPC}"
        for r in caplog.records
    )
    assert done_ids(tmp_path, 1) == []
    await store.remove(metas[1])
    assert done_ids(tmp_path, 1) == [metas[1].queue_id]
    assert len(open_done_files(tmp_path)) == 1
    store.close()


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
