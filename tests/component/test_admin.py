"""The admin listener over real HTTP on 127.0.0.1, with the proxy's hooks stubbed."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

import smtpbalancer.metrics  # noqa: F401 (registers the smtpbalancer_* metrics)
from smtpbalancer import admin_client
from smtpbalancer.admin import AdminApp, AdminHooks, AdminServer, Readiness
from smtpbalancer.config import MetricsConfig


class Proxy:
    def __init__(self) -> None:
        self.ready = Readiness(False, "no upstream eligible")
        self.drained: dict[str, bool] = {}
        self.weights: dict[str, int] = {}
        self.reloads = 0
        self.queue_calls: list[tuple[str, tuple[str, ...]]] = []

    def hooks(self) -> AdminHooks:
        async def reload() -> str:
            self.reloads += 1
            return "generation=2 changed=upstream.a.weight"

        async def queue(op: str, ids: tuple[str, ...]) -> dict[str, str]:
            self.queue_calls.append((op, ids))
            return {qid: "unknown" if qid.startswith("X") else f"{op}-done" for qid in ids}

        return AdminHooks(
            status=lambda: {"queue": {"messages": 3}},
            readiness=lambda: self.ready,
            drain=lambda name, on: name == "a" and self.drained.update({name: on}) is None,
            set_weight=lambda name, w: name == "a" and self.weights.update({name: w}) is None,
            reload=reload,
            queue=queue,
        )


@pytest.fixture
async def admin() -> AsyncIterator[tuple[Proxy, str]]:
    proxy = Proxy()
    server = AdminServer(
        AdminApp(proxy.hooks(), asyncio.get_running_loop(), token="s3cret"), "127.0.0.1", 0
    )
    server.start()
    yield proxy, f"http://127.0.0.1:{server.address[1]}"
    await asyncio.to_thread(server.stop)


def call(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


async def http(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    return await asyncio.to_thread(call, url, method, token)


async def test_healthz_readyz_status(admin: tuple[Proxy, str]) -> None:
    proxy, base = admin
    assert await http(f"{base}/healthz") == (200, {"status": "alive"})
    assert await http(f"{base}/readyz") == (503, {"ready": False, "reason": "no upstream eligible"})
    proxy.ready = Readiness(True)
    assert await http(f"{base}/readyz") == (200, {"ready": True, "reason": ""})
    assert await http(f"{base}/status") == (200, {"queue": {"messages": 3}})
    status, text = await http(f"{base}/metrics")
    assert status == 200 and "smtpbalancer_" in text


async def test_operations_need_the_token(admin: tuple[Proxy, str]) -> None:
    proxy, base = admin
    assert (await http(f"{base}/upstreams/a/drain", "POST"))[0] == 401
    assert (await http(f"{base}/upstreams/a/drain", "POST", token="wrong"))[0] == 401
    assert proxy.drained == {}
    assert await http(f"{base}/upstreams/a/drain", "POST", token="s3cret") == (
        200,
        {"upstream": "a", "drained": True},
    )
    assert proxy.drained == {"a": True}
    assert (await http(f"{base}/upstreams/a/undrain", "POST", token="s3cret"))[0] == 200
    assert proxy.drained == {"a": False}


async def test_weight_and_reload(admin: tuple[Proxy, str]) -> None:
    proxy, base = admin
    assert (await http(f"{base}/upstreams/a/weight?value=7", "POST", token="s3cret"))[0] == 200
    assert proxy.weights == {"a": 7}
    assert (await http(f"{base}/upstreams/a/weight?value=-1", "POST", token="s3cret"))[0] == 400
    assert (await http(f"{base}/upstreams/zz/weight?value=1", "POST", token="s3cret"))[0] == 404
    status, body = await http(f"{base}/reload", "POST", token="s3cret")
    assert status == 200 and body["reload"].startswith("generation=2")
    assert proxy.reloads == 1


async def test_healthz_fails_when_the_event_loop_is_stuck(admin: tuple[Proxy, str]) -> None:
    _, base = admin
    started = asyncio.Event()

    def probe() -> tuple[int, Any]:
        loop.call_soon_threadsafe(started.set)
        return call(f"{base}/healthz")

    loop = asyncio.get_running_loop()
    pending = asyncio.ensure_future(asyncio.to_thread(probe))
    await started.wait()
    time.sleep(1.3)  # noqa: ASYNC251 (blocking the loop is the point of this test)
    status, body = await pending
    assert status == 503 and "event loop" in body["error"]


async def test_queue_operations_take_ids_and_report_each(admin: tuple[Proxy, str]) -> None:
    proxy, base = admin
    assert (await http(f"{base}/queue/hold?id=A1", "POST"))[0] == 401
    assert await http(f"{base}/queue/hold?id=A1&id=X2", "POST", token="s3cret") == (
        200,
        {"op": "hold", "results": {"A1": "hold-done", "X2": "unknown"}},
    )
    assert (await http(f"{base}/queue/delete?id=X9", "POST", token="s3cret"))[0] == 404
    assert (await http(f"{base}/queue/delete", "POST", token="s3cret"))[0] == 400
    assert (await http(f"{base}/queue/delete?all=1", "POST", token="s3cret"))[0] == 400
    assert (await http(f"{base}/queue/retry?all=1", "POST", token="s3cret"))[0] == 200
    assert (await http(f"{base}/queue/purge?id=A1", "POST", token="s3cret"))[0] == 404
    assert proxy.queue_calls == [("hold", ("A1", "X2")), ("delete", ("X9",)), ("retry", ())]


async def test_the_cli_client_reaches_the_listener_with_the_token(
    admin: tuple[Proxy, str],
) -> None:
    _, base = admin
    port = int(base.rsplit(":", 1)[1])
    cfg = MetricsConfig(host="0.0.0.0", port=port, admin_token="s3cret")  # the CLI dials loopback
    status, doc = await asyncio.to_thread(admin_client.post, cfg, "/queue/release", [("id", "B")])
    assert (status, doc) == (200, {"op": "release", "results": {"B": "release-done"}})
    wrong = MetricsConfig(port=port, admin_token="nope")
    assert (await asyncio.to_thread(admin_client.post, wrong, "/queue/release", [("id", "B")]))[
        0
    ] == 401
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = MetricsConfig(port=unused.getsockname()[1])
    with pytest.raises(admin_client.AdminUnavailable):
        await asyncio.to_thread(admin_client.post, closed, "/queue/retry", [("all", "1")])
