"""SMTP AUTH PLAIN and LOGIN (RFC 4954, RFC 4616) against the users file.

aiosmtpd calls `plain`/`login` through the handler's `auth_PLAIN`/`auth_LOGIN`
(they replace its built-in mechanisms, whose credential check cannot await).
Invariants:
- The KDF runs in a thread (bounded by a semaphore): the loop never blocks on it.
- An unknown user costs one KDF like a known one (no user enumeration by timing),
  and the comparison is constant-time (passwords.verify).
- Failures are limited per connection (the last one is answered 421 4.7.0 and the
  connection closed) and per client IP within a window (421 4.7.0 at the next AUTH);
  each failure reply waits `delay_s` first.
- Passwords never reach a log line, an error text or a metric. Client responses are
  read here without aiosmtpd's challenge_auth, which logs undecodable ones, and a
  failed user name is not logged either (users type passwords into it).
- The authenticated user is kept here, per connection, not on aiosmtpd's Session.
aiosmtpd only sees our replies through `server.push`; every AuthResult we return
is `handled`, so aiosmtpd adds no reply of its own (and never touches the
deprecated Session.login_data, which logs a warning).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import AuthResult

from smtpbalancer import passwords, replies
from smtpbalancer.clock import Clock
from smtpbalancer.config import ServerConfig
from smtpbalancer.frontend.admission import session_ip
from smtpbalancer.replies import Reply

log = logging.getLogger(__name__)

_MAX_TRACKED_CLIENTS = 100_000
_HANDLED = AuthResult(success=False, handled=True)


class Authenticator:
    def __init__(self, users: Mapping[str, passwords.Scrypt], cfg: ServerConfig, clock: Clock):
        self._clock = clock
        self.reconfigure(users, cfg)
        self._kdf_slots = asyncio.Semaphore(max(2, os.cpu_count() or 2))
        # Keyed by the SMTP protocol object: one per connection, survives STARTTLS.
        self._user_of: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._failures_of: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._client_failures: dict[str, collections.deque[float]] = {}
        self.successes = 0
        self.failures = 0

    @classmethod
    def from_file(cls, path: Path, cfg: ServerConfig, clock: Clock) -> Authenticator:
        users = passwords.parse_users(path.read_text(encoding="utf-8"))
        return cls(users, cfg, clock)

    def reconfigure(self, users: Mapping[str, passwords.Scrypt], cfg: ServerConfig) -> None:
        """A reload: the users file's new contents and limits apply to the next AUTH.

        Connections that already authenticated stay authenticated (like a changed
        password on a logged-in session); failure counts carry over.
        """
        self._users = users
        self._max_failures = cfg.auth_max_failures
        self._max_per_client = cfg.auth_max_failures_per_client
        self._window_s = cfg.auth_failure_window_s
        self._delay_s = cfg.auth_failure_delay_s

    def __repr__(self) -> str:
        return (
            f"<Authenticator users={len(self._users)} ok={self.successes} failed={self.failures}"
            f" blocked_clients={sum(1 for c in self._client_failures if self._blocked(c))}>"
        )

    def user(self, server: Any) -> str | None:
        """The user this connection authenticated as, or None."""
        return self._user_of.get(server)

    async def plain(self, server: Any, args: list[str]) -> AuthResult:
        if await self._refuse_blocked(server):
            return _HANDLED
        response = await _first_response(server, args, b"")
        if response is None:
            return _HANDLED
        parts = response.split(b"\x00")
        if len(parts) != 3:
            await server.push(replies.BAD_SYNTAX.line)
            return _HANDLED
        authzid, login, password = parts
        if authzid and authzid != login:
            login = b""  # no proxy authorization: fails like an unknown user (after the KDF)
        return await self._check(server, "PLAIN", login, password)

    async def login(self, server: Any, args: list[str]) -> AuthResult:
        if await self._refuse_blocked(server):
            return _HANDLED
        user = await _first_response(server, args, b"Username:")
        if user is None:
            return _HANDLED
        password = await _challenge(server, b"Password:")
        if password is None:
            return _HANDLED
        return await self._check(server, "LOGIN", user, password)

    async def _check(
        self, server: Any, mechanism: str, login: bytes, password: bytes
    ) -> AuthResult:
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            name = ""
        stored = self._users.get(name)
        async with self._kdf_slots:
            matched = await asyncio.to_thread(passwords.verify, stored or passwords.DUMMY, password)
        client = session_ip(server.session)
        if matched and stored is not None:
            self.successes += 1
            self._user_of[server] = name
            server.session.authenticated = True  # aiosmtpd's own "503 Already authenticated"
            log.info("smtp.auth_ok client=%s user=%s mechanism=%s", client, name, mechanism)
            await server.push(replies.AUTH_OK.line)
            return _HANDLED
        self.failures += 1
        failures = self._failures_of.get(server, 0) + 1
        self._failures_of[server] = failures
        self._record_client_failure(client)
        log.warning(
            "smtp.auth_failed client=%s mechanism=%s connection_failures=%d",
            client,
            mechanism,
            failures,
        )
        if self._delay_s > 0:
            await self._clock.sleep(self._delay_s)  # slows guessing; the loop stays free
        if failures >= self._max_failures:
            await _goodbye(server, replies.AUTH_TOO_MANY_FAILURES)
        else:
            await server.push(replies.AUTH_INVALID.line)
        return _HANDLED

    async def _refuse_blocked(self, server: Any) -> bool:
        client = session_ip(server.session)
        if not self._blocked(client):
            return False
        log.warning("smtp.auth_blocked client=%s window_s=%.0f", client, self._window_s)
        await _goodbye(server, replies.AUTH_TOO_MANY_FAILURES)
        return True

    def _blocked(self, client: str) -> bool:
        recent = self._client_failures.get(client)
        if not recent:
            return False
        self._expire(recent)
        return len(recent) >= self._max_per_client

    def _record_client_failure(self, client: str) -> None:
        tracked = self._client_failures
        if client not in tracked and len(tracked) >= _MAX_TRACKED_CLIENTS:
            for key in [k for k, v in self._client_failures.items() if not self._expire(v)]:
                del self._client_failures[key]
        recent = self._client_failures.setdefault(client, collections.deque())
        recent.append(self._clock.monotonic())
        while len(recent) > self._max_per_client:
            recent.popleft()  # only the newest max_per_client times matter

    def _expire(self, recent: collections.deque[float]) -> int:
        horizon = self._clock.monotonic() - self._window_s
        while recent and recent[0] <= horizon:
            recent.popleft()
        return len(recent)


def tls_active(server: Any) -> bool:
    """True once the connection is encrypted: after STARTTLS, or on the implicit-TLS listener."""
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


async def _challenge(server: Any, text: bytes) -> bytes | None:
    """Send a 334 challenge and read the client's response, which is never logged."""
    await server.push("334 " + base64.b64encode(text).decode("ascii"))
    line: bytes = await server._reader.readline()
    if not line:
        return None
    blob = line.strip()
    if blob == b"*":  # RFC 4954 §4: the client cancels
        await server.push(replies.AUTH_ABORTED.line)
        return None
    return await _decode(server, blob.decode("ascii", "replace"))


async def _first_response(server: Any, args: list[str], prompt: bytes) -> bytes | None:
    """The initial response given with AUTH (RFC 4954 §4), or the answer to a challenge."""
    if len(args) > 1:
        return await _decode(server, args[1])
    return await _challenge(server, prompt)


async def _decode(server: Any, text: str) -> bytes | None:
    if text == "=":  # RFC 4954 §4: an empty initial response
        return b""
    try:
        return base64.b64decode(text.encode("ascii", "replace"), validate=True)
    except (binascii.Error, ValueError):
        await server.push(replies.AUTH_BAD_BASE64.line)
        return None


async def _goodbye(server: Any, reply: Reply) -> None:
    # As aiosmtpd's QUIT does: say it, stop the command loop, close (RFC 5321 §3.8).
    await server.push(reply.line)
    if server._handler_coroutine is not None:
        server._handler_coroutine.cancel()
    if server.transport is not None:
        server.transport.close()
