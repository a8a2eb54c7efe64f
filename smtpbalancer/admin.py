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
  POST /upstreams/NAME/weight?value=N, POST /reload,
  POST /queue/hold|release|delete|retry?id=QUEUE-ID (repeatable; retry?all=1) — operations.
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
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import ThreadingWSGIServer

from smtpbalancer import metrics

log = logging.getLogger(__name__)

LOOP_ANSWER_S = 1.0
_UPSTREAM_OP = re.compile(r"^/upstreams/([A-Za-z0-9_.-]+)/(drain|undrain|weight)$")
_QUEUE_OP = re.compile(r"^/queue/(hold|release|delete|retry)$")
QUEUE_OP_TIMEOUT_S = 30.0
FORWARD_TIMEOUT_S = QUEUE_OP_TIMEOUT_S + 5.0

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
    # (operation, queue ids; none means every message) -> outcome per queue id
    queue: Callable[[str, tuple[str, ...]], Awaitable[Mapping[str, str]]]


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
        queue_op = _QUEUE_OP.match(path)
        if queue_op is not None:
            return self._queue(queue_op.group(1), environ, start_response)
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

    def _queue(
        self, op: str, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        ids = tuple(query.get("id", []))
        every = query.get("all", [""])[0] in ("1", "true", "yes")
        if bool(ids) == every or (every and op != "retry"):
            return _reply(start_response, 400, {"error": "give ?id=QUEUE-ID (or retry?all=1)"})
        run = self._hooks.queue
        future = asyncio.run_coroutine_threadsafe(_await_op(run, op, ids), self._loop)
        results = dict(future.result(timeout=QUEUE_OP_TIMEOUT_S))
        log.warning("admin.queue op=%s ids=%s", op, ",".join(ids) or "all")
        known = [qid for qid, outcome in results.items() if outcome != "unknown"]
        code = 404 if ids and not known else 200
        return _reply(start_response, code, {"op": op, "results": results})

    def _authorized(self, environ: dict[str, Any]) -> bool:
        return _token_ok(self._token, environ)

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the event loop and wait (LOOP_ANSWER_S) for its result."""
        future = asyncio.run_coroutine_threadsafe(_call(fn), self._loop)
        try:
            return future.result(timeout=LOOP_ANSWER_S)
        except TimeoutError:
            future.cancel()
            raise


def _token_ok(token: str | None, environ: dict[str, Any]) -> bool:
    if token is None:
        return True
    given = str(environ.get("HTTP_AUTHORIZATION", ""))
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


async def _await(fn: Callable[[], Awaitable[str]]) -> str:
    return await fn()


async def _await_op(
    fn: Callable[[str, tuple[str, ...]], Awaitable[Mapping[str, str]]],
    op: str,
    ids: tuple[str, ...],
) -> Mapping[str, str]:
    return await fn(op, ids)


def _noop() -> None:
    return None


def _reply(start_response: StartResponse, code: int, body: Mapping[str, Any]) -> list[bytes]:
    payload = json.dumps(body, indent=1, sort_keys=True, default=str).encode() + b"\n"
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
              405: "Method Not Allowed", 500: "Internal Server Error",
              503: "Service Unavailable"}.get(code, "Error")  # fmt: skip
    start_response(
        f"{code} {reason}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
    )
    return [payload]


class FanOutApp:
    """The supervisor's admin listener with `workers > 1`: every request goes to every worker.

    `workers()` maps worker index to its admin URL (None while it (re)starts). Runs
    entirely in the HTTP threads: the supervisor's loop is never involved.
    """

    def __init__(
        self, workers: Callable[[], Mapping[str, str | None]], token: str | None = None
    ) -> None:
        self._workers = workers
        self._token = token

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        query = environ.get("QUERY_STRING", "")
        if method == "POST" and not _token_ok(self._token, environ):
            return _reply(start_response, 401, {"error": "admin token required"})
        if method not in ("GET", "POST"):
            return _reply(start_response, 405, {"error": "method not allowed"})
        answers = {
            worker: _forward(url, method, path, query, self._token)
            for worker, url in self._workers().items()
        }
        if path == "/metrics" and method == "GET":
            texts = {
                w: (body.decode() if code == 200 else None) for w, (code, body) in answers.items()
            }
            payload = metrics.merge_workers(texts)
            start_response(
                "200 OK",
                [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(payload)))],
            )
            return [payload]
        docs = {w: _json(body) for w, (_, body) in answers.items()}
        codes = {w: code for w, (code, _) in answers.items()}
        if path.startswith("/queue/") and method == "POST":
            return self._queue(start_response, path, docs, codes)
        all_ok = all(code == 200 for code in codes.values())
        doc: dict[str, Any] = {"workers": docs}
        if path == "/status":
            doc.update(
                _combined_queue(docs), ready=all(d.get("ready") is True for d in docs.values())
            )
        if path == "/readyz":
            doc["ready"] = all_ok
        if method == "POST":
            code = (
                200 if any(c == 200 for c in codes.values()) else max(codes.values(), default=503)
            )
        else:
            code = 200 if all_ok else (404 if set(codes.values()) == {404} else 503)
        return _reply(start_response, code, doc)

    def _queue(
        self,
        start_response: StartResponse,
        path: str,
        docs: Mapping[str, Mapping[str, Any]],
        codes: Mapping[str, int],
    ) -> Iterable[bytes]:
        """A queue id lives in one shard: take the answer of the worker that knew it."""
        if any(code in (400, 401) for code in codes.values()):
            code = next(c for c in codes.values() if c in (400, 401))
            return _reply(start_response, code, next(iter(docs.values())))
        results: dict[str, str] = {}
        for doc in docs.values():
            for qid, outcome in dict(doc.get("results", {})).items():
                if results.get(qid, "unknown") == "unknown":
                    results[qid] = str(outcome)
        known = any(outcome != "unknown" for outcome in results.values())
        every = "all=" in path or not results
        code = 200 if known or every else 404
        return _reply(start_response, code, {"op": path.rsplit("/", 1)[1], "results": results})


def _forward(
    url: str | None, method: str, path: str, query: str, token: str | None
) -> tuple[int, bytes]:
    if url is None:
        return 503, b'{"error": "worker starting"}'
    full = f"{url}{path}?{query}" if query else f"{url}{path}"
    request = urllib.request.Request(full, method=method, data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=FORWARD_TIMEOUT_S) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except OSError as exc:
        return 503, json.dumps({"error": f"worker unreachable: {exc}"}).encode()


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        return {"error": body.decode(errors="replace")[:200]}
    return doc if isinstance(doc, dict) else {"value": doc}


def _combined_queue(docs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    queues = [d.get("queue", {}) for d in docs.values() if isinstance(d.get("queue"), dict)]
    return {
        "queue": {
            "messages": sum(int(q.get("messages", 0)) for q in queues),
            "bytes": sum(int(q.get("bytes", 0)) for q in queues),
            "oldest_age_s": max((float(q.get("oldest_age_s", 0)) for q in queues), default=0.0),
        }
    }


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr: scrapes every few seconds would drown the real logs."""


class AdminServer:
    """The admin listener in a daemon thread."""

    def __init__(self, app: AdminApp | FanOutApp, host: str, port: int) -> None:
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
