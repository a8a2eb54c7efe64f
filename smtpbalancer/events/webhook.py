"""The webhook sender: drains one outbox to the ESP's URL, a signed batch per POST.

The request (HTTP/1.1, one connection per POST):

    POST /hooks/smtp HTTP/1.1
    Host: esp.example.com
    User-Agent: smtpbalancer/0.1.0
    Content-Type: application/json
    Content-Length: 1234
    X-Smtpbalancer-Timestamp: 1764291243
    X-Smtpbalancer-Signature: sha256=<hex of HMAC-SHA256(secret, body)>
    Connection: close

    {"sent_at":1764291243,"events":[{"event_id":"…","event":"delivery",…},…]}

Signature: HMAC-SHA256 keyed with the shared secret over the raw body bytes, exactly
as received, in lowercase hex. The timestamp is part of the signed body (`sent_at`,
unix seconds, equal to the header): a receiver that wants replay protection verifies
the signature, then rejects a `sent_at` far from its own clock. A retry carries the
same events (same `event_id`s) with a fresh `sent_at` and signature.

Delivery: any 2xx marks the batch sent (outbox.mark_sent). Anything else — connection
refused or reset, TLS failure, `timeout_s` without a full answer, any other status — is
retried with the same batch after 1 s, doubling up to `retry_max_s` (±20% jitter), and
the delay starts over after a success. A 4xx other than 408 or 429 will probably never
succeed, so it is logged at ERROR with the status and the body's first line, but it is
retried all the same: losing events is worse than a queue that waits for an operator
(the outbox's size bound drops the oldest if it fills). At least once: a 2xx lost on
the way back means the batch is sent again; receivers drop duplicates by `event_id`.

Batching: a POST carries up to `batch_size` events; a partial batch waits at most
`flush_interval_s` for more. HTTP is the stdlib's asyncio streams: no redirects, no
proxies, https with the system's CA store unless an SSLContext is given. The whole
exchange is bounded by `timeout_s` on the loop's own clock (a network timeout).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import hashlib
import hmac
import logging
import random
import re
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote, urlsplit

from smtpbalancer import __version__, metrics
from smtpbalancer.clock import Clock
from smtpbalancer.events.outbox import Batch, Outbox, OutboxError
from smtpbalancer.tasks import cancel_and_wait, spawn

log = logging.getLogger(__name__)

USER_AGENT: Final = f"smtpbalancer/{__version__}"
SIGNATURE_HEADER: Final = "X-Smtpbalancer-Signature"
TIMESTAMP_HEADER: Final = "X-Smtpbalancer-Timestamp"
_MAX_BODY_BYTES: Final = 4 << 20
_RETRY_AS_USUAL: Final = frozenset({408, 429})  # 4xx that say "later", not "never"
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.[01] ([1-9][0-9]{2})(?: ([^\r\n]*))?\r?\n")
_MAX_HEADERS: Final = 100
_SNIPPET: Final = 512


class Failure(enum.StrEnum):
    """Why a POST failed: the `reason` label of smtpbalancer_webhook_failures_total."""

    CONNECT = "connect"  # refused, reset, unreachable, TLS handshake or certificate
    TIMEOUT = "timeout"  # no full answer within timeout_s
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    PROTOCOL = "protocol"  # not an HTTP response, or a 1xx/3xx final status


class SenderState(enum.StrEnum):
    IDLE = "idle"  # not started
    WAITING = "waiting"  # for events, or for a partial batch to fill
    POSTING = "posting"
    BACKOFF = "backoff"  # after a failed POST, before the retry


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one POST came to: accepted (failure None), or why not."""

    failure: Failure | None
    status: int | None = None  # the HTTP status, when there was an answer
    detail: str = ""  # for logs: the status line and the body's first line, or the error

    @property
    def hopeless(self) -> bool:
        """A 4xx that does not mean "later": it will probably never succeed as is."""
        return self.failure is Failure.HTTP_4XX and self.status not in _RETRY_AS_USUAL


ACCEPTED: Final = Outcome(None)


def sign(secret: bytes, body: bytes) -> str:
    """The X-Smtpbalancer-Signature value for `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def build_body(docs: tuple[bytes, ...], sent_at: int) -> bytes:
    """The JSON request body: the stored documents spliced in as they are."""
    return b'{"sent_at":%d,"events":[%s]}' % (sent_at, b",".join(docs))


def backoff_s(attempt: int, *, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before retry number `attempt` (1-based): doubling from `initial_s`, ±20%
    jitter so that many instances do not retry in step, never above `max_s`."""
    base = min(max_s, initial_s * 2.0 ** min(attempt - 1, 60))
    return min(max_s, base * rng.uniform(0.8, 1.2))


@dataclass(frozen=True, slots=True)
class Target:
    """Where to POST, parsed once from the configured URL."""

    tls: bool
    host: str  # for connecting (no brackets around IPv6)
    port: int
    host_header: str
    path: str  # path and query, percent-encoded
    authorization: str | None  # from user:password@ in the URL

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        host_header = parts.netloc.rpartition("@")[2]
        if not host_header.isascii():
            raise ValueError("webhook host must be ASCII (use its punycode form)")
        tls = parts.scheme == "https"
        auth = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            auth = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        return cls(
            tls=tls,
            host=parts.hostname,
            port=parts.port or (443 if tls else 80),
            host_header=host_header,
            path=quote(path, safe="/?&=%:@!$'()*+,;~-._[]"),
            authorization=auth,
        )


class _ProtocolError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    detail: str  # status line and the body's first line, for logs


class WebhookSender:
    def __init__(
        self,
        outbox: Outbox,
        url: str,
        secret: str | bytes,
        *,
        batch_size: int,
        flush_interval_s: float,
        timeout_s: float,
        retry_max_s: float,
        clock: Clock,
        ssl_context: ssl.SSLContext | None = None,
        retry_initial_s: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self._outbox = outbox
        self._target = Target.parse(url)
        self._secret = secret.encode("utf-8") if isinstance(secret, str) else secret
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._timeout_s = timeout_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._ssl = ssl_context if self._target.tls else None  # default: made at first use
        self._metrics = metrics.EventMetrics(outbox.name)
        self.posts = 0  # accepted POSTs
        self.attempts = 0  # every POST tried
        self.failing = 0  # consecutive failures of the current batch
        self.state = SenderState.IDLE

    def __repr__(self) -> str:
        return (
            f"<WebhookSender {self._outbox.name} {self.state} posts={self.posts}"
            f" attempts={self.attempts} failing={self.failing}>"
        )

    async def run(self) -> None:
        """Send forever, in order; cancel to stop (an unsent batch stays in the outbox)."""
        read_failures = 0
        while True:
            self.state = SenderState.WAITING
            await self._wait_for_batch()
            try:
                batch = await self._outbox.read(self._batch_size, max_bytes=_MAX_BODY_BYTES)
            except OutboxError as exc:
                read_failures += 1
                log.error("events.read_failed outbox=%s errno=%s", self._outbox.name, exc.errno)
                await self._clock.sleep(self._backoff(read_failures))
                continue
            read_failures = 0
            if batch is None:  # counted but gone meanwhile (dropped): look again shortly
                await self._clock.sleep(self._flush_interval_s)
                continue
            await self._deliver(batch)
            await self._outbox.mark_sent(batch)

    async def _wait_for_batch(self) -> None:
        await self._outbox.wait_pending(1)
        if self._outbox.pending < self._batch_size:
            await _first_of(
                self._outbox.wait_pending(self._batch_size),
                self._clock.sleep(self._flush_interval_s),
                name=f"webhook-wait:{self._outbox.name}",
            )

    def _backoff(self, attempt: int) -> float:
        return backoff_s(
            attempt, initial_s=self._retry_initial_s, max_s=self._retry_max_s, rng=self._rng
        )

    async def _deliver(self, batch: Batch) -> None:
        """POST `batch` until the webhook accepts it."""
        self.failing = 0
        while True:
            self.state = SenderState.POSTING
            self.attempts += 1
            outcome = await self.post(batch.docs)
            if outcome.failure is None:
                self.posts += 1
                if self.failing:
                    log.info(
                        "events.webhook_recovered outbox=%s failed_attempts=%d",
                        self._outbox.name,
                        self.failing,
                    )
                self.failing = 0
                return
            self.failing += 1
            self._metrics.failures[outcome.failure].inc()
            delay = self._backoff(self.failing)
            log.log(
                logging.ERROR if outcome.hopeless else logging.WARNING,
                "events.webhook_failed outbox=%s reason=%s attempt=%d events=%d retry_in=%.1fs"
                " detail=%s",
                self._outbox.name,
                outcome.failure,
                self.failing,
                len(batch.docs),
                delay,
                outcome.detail,
            )
            self.state = SenderState.BACKOFF
            await self._clock.sleep(delay)

    async def post(self, docs: tuple[bytes, ...]) -> Outcome:
        """One signed POST of `docs`."""
        sent_at = int(self._clock.wall())
        body = build_body(docs, sent_at)
        request = self._head(body, sent_at) + body
        if self._target.tls and self._ssl is None:  # reads the CA store: not on the loop
            self._ssl = await asyncio.to_thread(ssl.create_default_context)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await asyncio.open_connection(
                    self._target.host,
                    self._target.port,
                    ssl=self._ssl,
                    server_hostname=self._target.host if self._target.tls else None,
                )
                writer.write(request)
                await writer.drain()
                answer = await _read_answer(reader)
        except TimeoutError:
            return Outcome(Failure.TIMEOUT, detail=f"no answer within {self._timeout_s:g}s")
        except OSError as exc:  # ConnectionError, ssl.SSLError, gaierror…
            return Outcome(Failure.CONNECT, detail=f"{type(exc).__name__}: {exc}"[:200])
        except _ProtocolError as exc:
            return Outcome(Failure.PROTOCOL, detail=str(exc))
        finally:
            if writer is not None:
                await _close(writer)
        return _classify(answer)

    def _head(self, body: bytes, sent_at: int) -> bytes:
        t = self._target
        lines = [
            f"POST {t.path} HTTP/1.1",
            f"Host: {t.host_header}",
            f"User-Agent: {USER_AGENT}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            f"{TIMESTAMP_HEADER}: {sent_at}",
            f"{SIGNATURE_HEADER}: {sign(self._secret, body)}",
            "Connection: close",
        ]
        if t.authorization is not None:
            lines.append(f"Authorization: {t.authorization}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _classify(answer: _Answer) -> Outcome:
    status = answer.status
    if 200 <= status < 300:
        return ACCEPTED
    if 400 <= status < 500:
        return Outcome(Failure.HTTP_4XX, status, answer.detail)
    if 500 <= status < 600:
        return Outcome(Failure.HTTP_5XX, status, answer.detail)
    return Outcome(Failure.PROTOCOL, status, answer.detail)  # a redirect is not followed


async def _read_answer(reader: asyncio.StreamReader) -> _Answer:
    while True:
        line = await _line(reader)
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise _ProtocolError(f"not an HTTP status line: {_printable(line)}")
        status = int(match[1])
        headers = await _headers(reader)
        if not 100 <= status < 200:  # 1xx are interim: the final answer follows
            break
    if 200 <= status < 300:
        return _Answer(status, "")  # the body is not needed
    detail = f"{status} {_printable(match[2] or b'')}"
    snippet = await _snippet(reader, headers)
    first = next((s for s in snippet.splitlines() if s.strip()), b"")
    if first:
        detail = f"{detail} | {_printable(first)}"
    return _Answer(status, detail)


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readline()
    except ValueError:  # longer than the reader's limit
        raise _ProtocolError("response line too long") from None
    if not line.endswith(b"\n"):
        raise _ProtocolError("connection closed before a full response")
    return line


async def _headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS):
        line = await _line(reader)
        if line in (b"\r\n", b"\n"):
            return headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    raise _ProtocolError("too many response headers")


async def _snippet(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The start of an error body, for the log (best effort)."""
    want = _SNIPPET
    if "chunked" in headers.get("transfer-encoding", "").lower():
        size = (await reader.readline()).split(b";")[0].strip()
        want = min(want, int(size, 16)) if re.fullmatch(rb"[0-9a-fA-F]{1,8}", size) else 0
    elif headers.get("content-length", "").isdigit():
        want = min(want, int(headers["content-length"]))
    data = b""
    while len(data) < want and (more := await reader.read(want - len(data))):
        data += more
    return data


def _printable(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):  # a peer that never answers TLS close_notify
            await writer.wait_closed()


async def _first_of(*coros: Coroutine[object, object, None], name: str) -> None:
    """Run the coroutines until the first one finishes; cancel the others."""
    tasks = [spawn(coro, name=f"{name}#{i}") for i, coro in enumerate(coros)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(tasks)
