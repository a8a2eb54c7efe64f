"""Named, owned background tasks.

`spawn` is the only place the project calls `asyncio.create_task`. It keeps a
strong reference until the task ends (the event loop holds only weak ones) and
logs an exception that nobody awaited, so a crashed loop is never silent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_live: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    task = asyncio.create_task(coro, name=name)
    _live.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _live.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("task.crashed name=%s error=%r", task.get_name(), exc, exc_info=exc)


RECANCEL_EVERY_S = 0.5


async def cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until every one has finished unwinding.

    A task can swallow a cancellation: on Python 3.11, `asyncio.wait_for` (used inside
    aiosmtplib and around QUIT) may return its inner result when the cancel lands just
    as that result arrives, and a loop then carries on as if never cancelled. So a
    task still running after a short wait is cancelled again, until it stops.
    """
    for task in tasks:
        task.cancel()
    pending = {task for task in tasks if not task.done()}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY_S)
        for task in pending:
            log.debug("task.recancel name=%s", task.get_name())
            task.cancel()
    for task in tasks:  # retrieve outcomes so none is reported as never retrieved
        if not task.cancelled():
            task.exception()
