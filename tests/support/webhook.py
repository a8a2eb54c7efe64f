"""A real HTTP endpoint on 127.0.0.1 that records webhook POSTs and answers as scripted.

`HookServer.plan` holds the statuses of the next answers (then 200 for ever); status 0
means "never answer" (until the server stops), for timeouts. `stop()` closes the
listening socket, so connections are refused until `start()` binds the same port again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True, slots=True)
class Request:
    path: str
    headers: dict[str, str]  # names lowercased
    body: bytes
    status: int  # what we answered

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(self.json["events"])

    def signed_with(self, secret: bytes) -> bool:
        mac = hmac.new(secret, self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(
            self.headers.get("x-smtpbalancer-signature", ""), f"sha256={mac}"
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        hook = self.server.hook
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status, text = hook.next_answer()
        headers = {k.lower(): v for k, v in self.headers.items()}
        if status == 0:
            with hook.lock:
                hook.hung += 1
            hook.release.wait(30)
            return
        with hook.lock:
            hook.requests.append(Request(self.path, headers, body, status))
        payload = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hook: HookServer


class HookServer:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.port = 0
        self.tls = tls
        self.requests: list[Request] = []
        self.plan: deque[tuple[int, str]] = deque()
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.hung = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hooks/smtp?tenant=7"

    @property
    def accepted(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def events(self) -> list[dict[str, Any]]:
        """Every event of every accepted POST, in arrival order."""
        return [e for r in self.accepted for e in r.events]

    def next_answer(self) -> tuple[int, str]:
        with self.lock:
            return self.plan.popleft() if self.plan else (200, "ok")

    def start(self) -> None:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.hook = self
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self.release.clear()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(10)
        self._server = self._thread = None
