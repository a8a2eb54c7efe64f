"""Polling with a deadline, never a bare sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0) -> None:
    # Not called wait_for, so nobody confuses it with asyncio.wait_for.
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
