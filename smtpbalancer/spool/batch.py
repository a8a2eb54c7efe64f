"""Group commit: many callers, one call on a dedicated thread per batch.

Callers `submit` an item and wait; items that arrive while a batch runs form the
next batch, so under load one thread call (one fdatasync, for the segment log)
serves many callers, and an idle spool still answers at once (a batch of one).
A batch is capped by item count and bytes; a single item larger than the byte
cap is a batch of its own. Every caller of a batch gets the same outcome: done,
or the batch's exception.

Memory: items are not copied; the pending batches hold references to what the
callers already hold (a session's body), so the queue is bounded by the callers
(sessions, delivery slots), not by this module.

`settle` runs on the event loop after each batch, before any caller resumes, with
the batch's result or exception: the store indexes what was written there, so a
caller cancelled meanwhile cannot leave a durable record unaccounted for.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from smtpbalancer.errors import SpoolError
from smtpbalancer.tasks import spawn

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class _Batch(Generic[T]):
    done: asyncio.Future[None]
    items: list[T] = field(default_factory=list)
    size: int = 0


class Batcher(Generic[T, R]):
    def __init__(
        self,
        name: str,
        run: Callable[[list[T]], R],
        *,
        size: Callable[[T], int],
        max_items: int,
        max_bytes: int,
        settle: Callable[[list[T], R | Exception], None] | None = None,
    ) -> None:
        self._name = name
        self._run = run
        self._size = size
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._settle = settle
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._queue: deque[_Batch[T]] = deque()  # waiting batches; the running one is not here
        self._draining = False
        self._idle = threading.Event()  # no batch waiting or running (for close, in a thread)
        self._idle.set()
        self.batches = 0  # completed thread calls, for reprs and tests
        self.items = 0

    def __repr__(self) -> str:
        waiting = sum(len(b.items) for b in self._queue)
        return f"<Batcher {self._name} batches={self.batches} items={self.items} waiting={waiting}>"

    def post(self, item: T) -> asyncio.Future[None]:
        """Queue an item without waiting; returns its batch's future."""
        size = self._size(item)
        batch = self._queue[-1] if self._queue else None
        if (
            batch is None
            or len(batch.items) >= self._max_items
            or (batch.items and batch.size + size > self._max_bytes)
        ):
            batch = _Batch(asyncio.get_running_loop().create_future())
            self._queue.append(batch)
        batch.items.append(item)
        batch.size += size
        if not self._draining:
            self._draining = True
            self._idle.clear()
            spawn(self._drain(), name=self._name)
        return batch.done

    async def submit(self, item: T) -> None:
        """Queue an item and wait until its batch has run. Raises the batch's exception."""
        # Shielded: one caller giving up must not cancel the outcome for the others.
        await asyncio.shield(self.post(item))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch = self._queue.popleft()
                try:
                    result = await loop.run_in_executor(self._executor, self._run, batch.items)
                except asyncio.CancelledError:
                    batch.done.set_exception(SpoolError(f"{self._name} cancelled"))
                    batch.done.exception()
                    raise
                except Exception as exc:
                    if not isinstance(exc, SpoolError):  # a bug, or the store closed under us
                        log.error("spool.batch_failed batcher=%s", self._name, exc_info=exc)
                        exc = SpoolError(f"{self._name} failed")
                    self._finish(batch, exc)
                    batch.done.set_exception(exc)
                    batch.done.exception()  # retrieved: the waiters re-raise it themselves
                else:
                    self._finish(batch, result)
                    batch.done.set_result(None)
        finally:
            self._draining = False
            self._idle.set()
            while self._queue:  # only after a cancellation: the loop is going away
                left = self._queue.popleft()
                left.done.set_exception(SpoolError(f"{self._name} stopped"))
                left.done.exception()

    def _finish(self, batch: _Batch[T], outcome: R | Exception) -> None:
        self.batches += 1
        self.items += len(batch.items)
        if self._settle is not None:
            try:
                self._settle(batch.items, outcome)
            except Exception:  # a bug: log it, but never leave the callers waiting
                log.exception("spool.settle_failed batcher=%s", self._name)

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every batch posted so far has run (from a thread other than the
        loop's, which keeps running them). False on timeout."""
        return self._idle.wait(timeout_s)

    def close(self) -> None:
        """Wait for the running batch (blocking); later submissions are not run."""
        self._executor.shutdown(wait=True)
