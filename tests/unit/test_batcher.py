"""Group commit's Batcher: one thread call per batch, per-caller futures, settle first."""

from __future__ import annotations

import asyncio
import threading

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
