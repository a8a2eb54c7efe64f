"""Group commit's Batcher: one thread call per batch, per-caller futures, settle first."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from smtpbalancer.errors import SpoolError
from smtpbalancer.spool.batch import Batcher


def make(
    run: object = None, settled: list[tuple[list[int], object]] | None = None
) -> tuple[Batcher[int, int], list[list[int]]]:
    calls: list[list[int]] = []

    def default_run(items: list[int]) -> int:
        calls.append(list(items))
        return sum(items)

    def settle(items: list[int], outcome: object) -> None:
        if settled is not None:
            settled.append((list(items), outcome))

    batcher: Batcher[int, int] = Batcher(
        "test-batch",
        run or default_run,  # type: ignore[arg-type]
        size=lambda item: item,
        max_items=3,
        max_bytes=100,
        settle=settle,
    )
    return batcher, calls


async def test_arrivals_in_one_loop_turn_share_a_batch_and_caps_split_them() -> None:
    batcher, calls = make()
    await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3, 4, 5)))
    assert calls == [[1, 2, 3], [4, 5]]  # max_items=3
    await asyncio.gather(batcher.submit(60), batcher.submit(50))
    assert calls[-2:] == [[60], [50]]  # max_bytes=100
    assert batcher.wait_idle(1.0)
    batcher.close()


async def test_settle_runs_before_any_caller_resumes() -> None:
    settled: list[tuple[list[int], object]] = []
    batcher, _ = make(settled=settled)
    seen: list[int] = []

    async def one(i: int) -> None:
        await batcher.submit(i)
        seen.append(len(settled))

    await asyncio.gather(one(1), one(2))
    assert settled == [([1, 2], 3)] and seen == [1, 1]
    batcher.close()


async def test_a_cancelled_caller_does_not_cancel_the_batch() -> None:
    gate = threading.Event()
    ran: list[list[int]] = []

    def slow(items: list[int]) -> int:
        gate.wait(5)
        ran.append(items)
        return 0

    batcher, _ = make(run=slow)
    quitter = asyncio.ensure_future(batcher.submit(1))
    stayer = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.01)
    quitter.cancel()
    gate.set()
    await stayer
    assert quitter.cancelled() and ran == [[1, 2]]
    batcher.close()


async def test_failures_reach_every_caller_as_spool_errors() -> None:
    def broken(items: list[int]) -> int:
        raise ValueError("bug")

    batcher, _ = make(run=broken)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert [type(r) for r in results] == [SpoolError, SpoolError]
    batcher.post(3)  # nobody waits: the failure is only logged
    assert await asyncio.to_thread(batcher.wait_idle, 1.0)
    batcher.close()
    with pytest.raises(SpoolError):
        await batcher.submit(4)  # closed: later submissions never run


def make_eager(
    run: object,
    settled: list[tuple[list[int], object]] | None = None,
    *,
    slow_settle: bool = False,
    on_loop_under_s: float | None = None,
) -> Batcher[int, int]:
    def settle(items: list[int], outcome: object) -> None:
        if slow_settle:
            time.sleep(0.001)  # lets the thread run, were it woken before settle ends
        if settled is not None:
            settled.append((list(items), outcome))

    return Batcher(
        "test-eager",
        run,  # type: ignore[arg-type]
        size=lambda item: item,
        max_items=3,
        max_bytes=100,
        settle=settle,
        eager=True,
        on_loop_under_s=on_loop_under_s,
    )


async def test_an_eager_batcher_starts_the_first_batch_without_waiting_for_a_loop_turn() -> None:
    started = threading.Event()

    def run(items: list[int]) -> int:
        started.set()
        return 0

    eager = make_eager(run)
    waiter = eager.queue(1)
    # Blocking the loop releases the GIL: only the thread can run the batch now.
    assert started.wait(5)
    await waiter
    eager.close()

    started.clear()
    lazy, _ = make(run=run)
    waiter = lazy.queue(1)
    assert not started.wait(0.2)  # the lazy one waits for the next loop turn
    await waiter
    assert started.is_set()
    lazy.close()


async def test_an_eager_batcher_gathers_what_arrives_while_a_batch_runs() -> None:
    gate = threading.Event()
    calls: list[list[int]] = []

    def run(items: list[int]) -> int:
        calls.append(list(items))
        gate.wait(5)
        return 0

    batcher = make_eager(run)
    first = batcher.queue(1)
    for _ in range(100):  # until the thread holds the first batch
        if calls:
            break
        await asyncio.sleep(0.01)
    rest = [batcher.queue(i) for i in (2, 3, 4, 5)]
    gate.set()
    await asyncio.gather(first, *rest)
    assert calls == [[1], [2, 3, 4], [5]]  # max_items=3
    batcher.close()


async def test_an_eager_batcher_writes_every_item_once_in_order_and_settles_between() -> None:
    """Bursts from the loop while the thread takes batches: no item is lost, none is
    written twice, order is kept, and the thread starts a batch only once the loop has
    settled the one before."""
    settled: list[tuple[list[int], object]] = []
    calls: list[list[int]] = []

    def run(items: list[int]) -> int:
        assert len(settled) == len(calls), "a batch started before the last one settled"
        calls.append(list(items))
        return len(items)

    batcher = make_eager(run, settled, slow_settle=True)
    waiters: list[asyncio.Future[None]] = []
    item = 0
    for burst in range(300):
        for _ in range(burst % 7 + 1):
            item += 1
            waiters.append(batcher.queue(item % 40))
        await asyncio.sleep(0)
    await asyncio.gather(*waiters)
    written = [i for batch in calls for i in batch]
    assert written == [i % 40 for i in range(1, item + 1)]
    assert [items for items, _ in settled] == calls
    assert batcher.wait_idle(1.0)
    batcher.close()


async def test_callbacks_are_told_in_the_turn_their_batch_completes_after_settle() -> None:
    settled: list[tuple[list[int], object]] = []
    batcher, _ = make(settled=settled)
    told: list[tuple[int, object, int]] = []
    resumed: list[int] = []

    def broken(error: Exception | None) -> None:
        raise RuntimeError("a bug in one caller")

    async def waiter() -> None:
        await batcher.submit(3)
        resumed.append(len(told))

    task = asyncio.ensure_future(waiter())
    batcher.then(1, lambda error: told.append((1, error, len(settled))))
    batcher.then(2, broken)  # logged; the others are still told
    batcher.then(4, lambda error: told.append((4, error, len(settled))))
    await task
    assert told == [(1, None, 1), (4, None, 1)]  # after settle, and before the future's waiter
    assert resumed == [2]
    batcher.close()

    def failing(items: list[int]) -> int:
        raise SpoolError("write segment", 28)

    batcher, _ = make(run=failing)
    errors: list[Exception | None] = []
    done = asyncio.Event()
    batcher.then(1, lambda error: (errors.append(error), done.set()))
    await asyncio.wait_for(done.wait(), 5)
    assert isinstance(errors[0], SpoolError)
    batcher.close()


def make_on_loop(
    run: object, settled: list[tuple[list[int], object]] | None = None, *, under_s: float = 1.0
) -> Batcher[int, int]:
    """An eager batcher that runs its batches on the loop while they take under `under_s`."""
    return make_eager(run, settled, on_loop_under_s=under_s)


async def test_fast_batches_run_on_the_loop_at_the_end_of_the_turn_and_answer_in_it() -> None:
    calls: list[tuple[list[int], bool]] = []

    def run(items: list[int]) -> int:
        calls.append((list(items), threading.current_thread() is threading.main_thread()))
        return 0

    settled: list[tuple[list[int], object]] = []
    batcher = make_on_loop(run, settled)
    told: list[tuple[int, Exception | None, int]] = []
    for i in (1, 2, 3, 4, 5):
        batcher.then(i, lambda error, i=i: told.append((i, error, len(settled))))
    assert calls == []  # not before the turn's I/O is served
    await asyncio.sleep(0)  # one turn: the loop ran both batches and told every caller
    assert calls == [([1, 2, 3], True), ([4, 5], True)]  # max_items=3
    assert told == [(1, None, 1), (2, None, 1), (3, None, 1), (4, None, 2), (5, None, 2)]
    assert batcher.wait_idle(0)
    batcher.close()


async def test_slow_batches_go_to_the_thread_until_fast_runs_there_bring_them_back() -> None:
    delay = [0.05]
    where: list[str] = []

    def run(items: list[int]) -> int:
        where.append("loop" if threading.current_thread() is threading.main_thread() else "thread")
        time.sleep(delay[0])
        return 0

    batcher = make_on_loop(run, under_s=0.005)
    await batcher.submit(1)  # nothing known yet: on the loop, and slow
    await batcher.submit(2)  # so the next one blocks the thread, not the loop
    delay[0] = 0.0
    for i in range(3, 7):  # fast now: once most of the recent runs are, back on the loop
        await batcher.submit(i)
    assert where == ["loop", "thread", "thread", "thread", "thread", "loop"]
    batcher.close()


async def test_a_few_slow_runs_among_fast_ones_keep_batches_on_the_loop() -> None:
    """A busy machine makes some runs slow (the process waits for a CPU after its
    fdatasync): the typical run decides, not the occasional one."""
    runs = iter([0.0, 0.0, 0.03, 0.0, 0.0, 0.03, 0.0, 0.0, 0.03, 0.0, 0.0, 0.03])
    where: list[bool] = []

    def run(items: list[int]) -> int:
        where.append(threading.current_thread() is threading.main_thread())
        time.sleep(next(runs))
        return 0

    batcher = make_on_loop(run, under_s=0.005)
    for i in range(12):
        await batcher.submit(i)
    assert where == [True] * 12
    batcher.close()


async def test_a_failed_batch_on_the_loop_fails_its_callers_and_not_the_next_batch() -> None:
    fail = [True]

    def run(items: list[int]) -> int:
        if fail[0]:
            raise ValueError("bug")
        return 0

    batcher = make_on_loop(run)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert [type(r) for r in results] == [SpoolError, SpoolError]
    fail[0] = False
    await batcher.submit(3)
    batcher.close()
    with pytest.raises(SpoolError):
        await batcher.submit(4)  # closed: later submissions never run
