"""Persistent, reused connections to one upstream, at most max_connections.

A lease hands out an idle connection (most recently used first, so spare
connections age out), opens a new one while under the limit, or waits. The
release path never awaits: a connection that is broken, exhausted
(max_messages_per_connection) or retired is closed by a spawned task.
Idle connections older than idle_timeout are closed when next seen.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from smtpbalancer.clock import Clock
from smtpbalancer.tasks import spawn
from smtpbalancer.upstream.connection import UpstreamConnection


class Pool:
    def __init__(
        self,
        name: str,
        factory: Callable[[], UpstreamConnection],
        clock: Clock,
        *,
        max_connections: int,
        max_messages: int,
        idle_timeout_s: float = 30.0,
    ) -> None:
        self.name = name
        self._factory = factory
        self._clock = clock
        self.max_connections = max_connections
        self._max_messages = max_messages
        self._idle_timeout_s = idle_timeout_s
        self._idle: list[UpstreamConnection] = []
        self._size = 0  # open + connecting
        self._busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self.opened_total = 0

    def __repr__(self) -> str:
        return (
            f"<Pool {self.name} conns={self._size}/{self.max_connections} busy={self._busy}"
            f" idle={len(self._idle)} waiting={len(self._waiters)}>"
        )

    @property
    def size(self) -> int:
        return self._size

    async def acquire(self) -> UpstreamConnection:
        """A connection for one transaction; every acquire is paired with one `release`
        (a try/finally, not an async context manager: this is once per message)."""
        conn = await self._acquire()
        self._busy += 1
        return conn

    def acquire_idle(self) -> UpstreamConnection | None:
        """`acquire` without awaiting, when an idle connection is ready (the common case);
        None when the caller must `acquire` (open one, or wait). Paired with `release`."""
        now = self._clock.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable and now - conn.idle_since < self._idle_timeout_s:
                self._busy += 1
                return conn
            self._discard(conn)
        return None

    def release(self, conn: UpstreamConnection, *, completed: bool) -> None:
        """Back to the idle set if its transaction completed and it can take more; else
        closed (a transaction cut short by an error or a cancellation may have replies in
        flight)."""
        self._busy -= 1
        self._release(conn, completed and conn.usable and conn.messages < self._max_messages)

    async def _acquire(self) -> UpstreamConnection:
        while True:
            now = self._clock.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if conn.usable and now - conn.idle_since < self._idle_timeout_s:
                    return conn
                self._discard(conn)
            if self._size < self.max_connections:
                self._size += 1  # slot reserved before any await
                conn = self._factory()
                try:
                    await conn.open()
                except BaseException:
                    self._size -= 1
                    self._wake_one()
                    raise
                self.opened_total += 1
                return conn
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _release(self, conn: UpstreamConnection, reusable: bool) -> None:
        if reusable and not self._closed and self._size <= self.max_connections:
            conn.idle_since = self._clock.monotonic()
            self._idle.append(conn)
        else:
            self._discard(conn)
        if self._waiters:
            self._wake_one()

    def _discard(self, conn: UpstreamConnection) -> None:
        self._size -= 1
        spawn(conn.close(), name=f"pool-close:{self.name}")

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def resize(self, max_connections: int, max_messages: int) -> None:
        """A config reload: new limits; connections over the new maximum close when released."""
        self.max_connections = max_connections
        self._max_messages = max_messages
        for _ in range(max(0, max_connections - self._size)):
            self._wake_one()  # waiters may now open a connection

    def close_idle(self, older_than_s: float = 0.0) -> None:
        now = self._clock.monotonic()
        keep = []
        for conn in self._idle:
            if now - conn.idle_since >= older_than_s:
                self._discard(conn)
            else:
                keep.append(conn)
        self._idle = keep

    async def close(self) -> None:
        """Stop handing out connections and close the idle ones (QUIT)."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._size -= len(idle)
        await asyncio.gather(*(conn.close() for conn in idle))
