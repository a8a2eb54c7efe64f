"""The admin HTTP listener: /metrics, /healthz, /readyz, /status and operations.

Served from a small threaded WSGI server (the same machinery prometheus-client
uses for /metrics) so a busy event loop never delays a scrape. This module
imports no subsystem: the app hands it callables. Anything that touches the
proxy's state runs on the event loop (`run_coroutine_threadsafe`), never in
the HTTP thread.

- GET /healthz — the process and its event loop are alive (the loop must answer
  within a second). Never depends on upstreams: restarting would not fix them.
- GET /readyz — ready to take mail: not draining, spool writable, at least one
  upstream eligible. 503 with the reason otherwise.
- GET /status — JSON snapshot: upstreams (health, breaker, weight, connections,
  effective rate, drained), queue (messages, bytes, oldest age), sessions.
- POST /upstreams/NAME/drain, /upstreams/NAME/undrain,
  POST /upstreams/NAME/weight?value=N, POST /reload — operations.
Operations need `Authorization: Bearer TOKEN` when a token is configured; the
app requires one whenever the listener is not on loopback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

LOOP_ANSWER_S = 1.0
_UPSTREAM_OP = re.compile(r"^/upstreams/([A-Za-z0-9_.-]+)/(drain|undrain|weight)$")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AdminHooks:
    """What the admin listener may ask of the running proxy (all run on the loop)."""

    status: Callable[[], Mapping[str, Any]]
    readiness: Callable[[], Readiness]
    drain: Callable[[str, bool], bool]  # (upstream, drained) -> known upstream?
    set_weight: Callable[[str, int], bool]
    reload: Callable[[], Awaitable[str]]  # -> a one-line outcome


class AdminApp:
    """The WSGI application; `loop` is the proxy's event loop."""

    def __init__(
        self, hooks: AdminHooks, loop: asyncio.AbstractEventLoop, token: str | None = None
    ) -> None:
        self._hooks = hooks
        self._loop = loop
        self._token = token
        self._metrics = prometheus_client.make_wsgi_app()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            result: Iterable[bytes] = self._metrics(environ, start_response)
            return result
        try:
            if method == "GET":
                return self._get(path, start_response)
            if method == "POST":
                if not self._authorized(environ):
                    return _reply(start_response, 401, {"error": "admin token required"})
                return self._post(path, environ, start_response)
            return _reply(start_response, 405, {"error": "method not allowed"})
        except TimeoutError:
            return _reply(start_response, 503, {"error": "event loop did not answer"})

    def _get(self, path: str, start_response: StartResponse) -> Iterable[bytes]:
        if path == "/healthz":
            self._on_loop(_noop)
            return _reply(start_response, 200, {"status": "alive"})
        if path == "/readyz":
            readiness: Readiness = self._on_loop(self._hooks.readiness)
            code = 200 if readiness.ready else 503
            return _reply(
                start_response, code, {"ready": readiness.ready, "reason": readiness.reason}
            )
        if path == "/status":
            return _reply(start_response, 200, dict(self._on_loop(self._hooks.status)))
        return _reply(start_response, 404, {"error": "not found"})

    def _post(
        self, path: str, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        if path == "/reload":
            outcome = asyncio.run_coroutine_threadsafe(_await(self._hooks.reload), self._loop)
            return _reply(start_response, 200, {"reload": outcome.result(timeout=30)})
        found = _UPSTREAM_OP.match(path)
        if found is None:
            return _reply(start_response, 404, {"error": "not found"})
        name, op = found.groups()
        if op == "weight":
            values = parse_qs(environ.get("QUERY_STRING", "")).get("value", [])
            if len(values) != 1 or not values[0].isdigit():
                return _reply(start_response, 400, {"error": "weight needs ?value=N (N >= 0)"})
            weight = int(values[0])
            known = self._on_loop(lambda: self._hooks.set_weight(name, weight))
            detail: dict[str, Any] = {"upstream": name, "weight": weight}
        else:
            drained = op == "drain"
            known = self._on_loop(lambda: self._hooks.drain(name, drained))
            detail = {"upstream": name, "drained": drained}
        if not known:
            return _reply(start_response, 404, {"error": f"no upstream {name!r}"})
        log.warning("admin.operation %s", " ".join(f"{k}={v}" for k, v in detail.items()))
        return _reply(start_response, 200, detail)

    def _authorized(self, environ: dict[str, Any]) -> bool:
        if self._token is None:
            return True
        given = str(environ.get("HTTP_AUTHORIZATION", ""))
        return hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode())

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the event loop and wait (LOOP_ANSWER_S) for its result."""
        future = asyncio.run_coroutine_threadsafe(_call(fn), self._loop)
        try:
            return future.result(timeout=LOOP_ANSWER_S)
        except TimeoutError:
            future.cancel()
            raise


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


async def _await(fn: Callable[[], Awaitable[str]]) -> str:
    return await fn()


def _noop() -> None:
    return None


def _reply(start_response: StartResponse, code: int, body: Mapping[str, Any]) -> list[bytes]:
    payload = json.dumps(body, indent=1, sort_keys=True, default=str).encode() + b"\n"
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
              405: "Method Not Allowed", 503: "Service Unavailable"}[code]  # fmt: skip
    start_response(
        f"{code} {reason}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
    )
    return [payload]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr: scrapes every few seconds would drown the real logs."""


class AdminServer:
    """The admin listener in a daemon thread."""

    def __init__(self, app: AdminApp, host: str, port: int) -> None:
        self._server: WSGIServer = make_server(
            host, port, app, server_class=ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.address = (host, int(self._server.server_port))
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="admin-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
