"""Shared fixtures: sinks on ephemeral loopback ports, cleaned up after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from smtpbalancer.sink import Sink


@pytest.fixture
async def sinks() -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await sinks(name, **options)` starts a Sink on 127.0.0.1:0."""
    started: list[Sink] = []

    async def start(name: str = "sink", **options: Any) -> Sink:
        sink = Sink(name=name, keep=True, **options)
        await sink.start()
        started.append(sink)
        return sink

    yield start
    for sink in started:
        await sink.stop()


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await proxies(config_path)` runs `smtpbalancer serve`; killed at teardown."""
    from support.proxy import ProxyProcess

    started: list[ProxyProcess] = []

    async def start(config_path: Any, preexec_fn: Any = None) -> ProxyProcess:
        proc = ProxyProcess(config_path, preexec_fn)
        started.append(proc)
        await proc.start()
        return proc

    yield start
    for proc in started:
        await proc.kill()
