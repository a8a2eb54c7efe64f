"""cancel_and_wait stops even a task that swallowed its first cancellation."""

from __future__ import annotations

import asyncio
import contextlib

from smtpbalancer.tasks import cancel_and_wait


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed == 0:  # what a racing asyncio.wait_for can do on Python 3.11
                    swallowed += 1
                    continue
                raise

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0.02)
    async with asyncio.timeout(5):
        await cancel_and_wait([task])
    assert task.cancelled() and swallowed == 1


async def test_results_and_errors_of_finished_tasks_are_retrieved() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.ensure_future(fails())
    with contextlib.suppress(RuntimeError):
        await asyncio.sleep(0)
    await cancel_and_wait([task])
    assert task.done() and isinstance(task.exception(), RuntimeError)
