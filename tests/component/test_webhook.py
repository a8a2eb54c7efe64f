"""The webhook sender against a real HTTP server on 127.0.0.1: signing, batching,
retries, outages, restarts, TLS and the EventLog facade."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client import REGISTRY
from support.waiting import wait_until
from support.webhook import HookServer

from smtpbalancer import __version__
from smtpbalancer.clock import SystemClock
from smtpbalancer.config import EventsConfig
from smtpbalancer.events.event import DeliveryEvent, IncidentEvent
from smtpbalancer.events.log import EventLog
from smtpbalancer.events.outbox import Outbox
from smtpbalancer.events.webhook import WebhookSender
from smtpbalancer.tasks import cancel_and_wait, spawn

SECRET = b"whsec-test-0123456789"


@pytest.fixture
async def hook() -> AsyncIterator[HookServer]:
    server = HookServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def outboxes(tmp_path: Path) -> AsyncIterator[Callable[..., Outbox]]:
    opened: list[Outbox] = []

    def make(name: str, **kw: Any) -> Outbox:
        box = Outbox(tmp_path / name, SystemClock(), name=name, **kw)
        box.open()
        opened.append(box)
        return box

    yield make
    for box in opened:
        await box.drain()
        box.close()


@asynccontextmanager
async def sending(outbox: Outbox, url: str, **kw: Any) -> AsyncIterator[WebhookSender]:
    options: dict[str, Any] = {
        "batch_size": 100,
        "flush_interval_s": 0.05,
        "timeout_s": 5.0,
        "retry_max_s": 0.2,
        "retry_initial_s": 0.05,
        "clock": SystemClock(),
    }
    options.update(kw)
    sender = WebhookSender(outbox, url, SECRET, **options)
    task = spawn(sender.run(), name="test-webhook")
    try:
        yield sender
    finally:
        await cancel_and_wait([task])


def _docs(first: int, count: int) -> list[dict[str, object]]:
    return [{"event": "delivery", "n": n} for n in range(first, first + count)]


def _failures(outbox: str, reason: str) -> float:
    labels = {"outbox": outbox, "reason": reason}
    return REGISTRY.get_sample_value("smtpbalancer_webhook_failures_total", labels) or 0.0


async def test_a_batch_is_signed_with_the_shared_secret(
    hook: HookServer, outboxes: Callable[..., Outbox]
) -> None:
    box = outboxes("signed")
    await box.append(_docs(0, 3))
    async with sending(box, hook.url):
        await wait_until(lambda: len(hook.accepted) == 1)
    [req] = hook.accepted
    assert req.path == "/hooks/smtp?tenant=7"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["user-agent"] == f"smtpbalancer/{__version__}"
    mac = hmac.new(SECRET, req.body, hashlib.sha256).hexdigest()  # computed independently
    assert req.headers["x-smtpbalancer-signature"] == f"sha256={mac}"
    assert not req.signed_with(b"another secret")
    # the timestamp is inside the signed body, and the header repeats it
    assert req.json["sent_at"] == int(req.headers["x-smtpbalancer-timestamp"])
    assert [e["n"] for e in req.events] == [0, 1, 2]
    assert len({e["event_id"] for e in req.events}) == 3


async def test_250_events_with_batch_size_100_make_three_posts(
    hook: HookServer, outboxes: Callable[..., Outbox]
) -> None:
    box = outboxes("batches")
    await box.append(_docs(0, 250))
    async with sending(box, hook.url, batch_size=100, flush_interval_s=0.2):
        await wait_until(lambda: box.pending == 0 and len(hook.accepted) == 3)
    assert [len(r.events) for r in hook.accepted] == [100, 100, 50]
    assert [e["n"] for e in hook.events()] == list(range(250))
    assert all(r.signed_with(SECRET) for r in hook.accepted)


async def test_a_full_batch_goes_at_once_without_waiting_for_the_flush_interval(
    hook: HookServer, outboxes: Callable[..., Outbox]
) -> None:
    box = outboxes("full-batch")
    async with sending(box, hook.url, batch_size=10, flush_interval_s=60.0):
        await box.append(_docs(0, 3))
        await asyncio.sleep(0.3)  # a window in which nothing may be sent
        assert hook.accepted == []  # a partial batch waits for more
        await box.append(_docs(3, 7))  # now full: it goes long before the interval is out
        await wait_until(lambda: len(hook.accepted) == 1, timeout=10)
    assert [e["n"] for e in hook.events()] == list(range(10))


async def test_a_partial_batch_goes_after_the_flush_interval(
    hook: HookServer, outboxes: Callable[..., Outbox]
) -> None:
    box = outboxes("partial")
    loop = asyncio.get_running_loop()
    async with sending(box, hook.url, batch_size=100, flush_interval_s=0.5):
        await box.append(_docs(0, 2))
        appended = loop.time()
        await wait_until(lambda: len(hook.accepted) == 1)
        waited = loop.time() - appended
    assert waited >= 0.45  # it did wait for more events first
    assert [len(r.events) for r in hook.accepted] == [2]


async def test_an_outage_loses_nothing_and_keeps_the_order(
    hook: HookServer, outboxes: Callable[..., Outbox]
) -> None:
    box = outboxes("outage")
    refused_before = _failures("outage", "connect")
    hook.stop()  # connection refused from now on
    async with sending(box, hook.url, batch_size=25) as sender:
        for chunk in range(6):
            await box.append(_docs(chunk * 30, 30))
        await wait_until(lambda: sender.failing >= 3)
        assert hook.requests == []
        hook.start()  # the same port
        await wait_until(lambda: len(hook.events()) == 180)
        await wait_until(lambda: box.pending == 0)
    events = hook.events()
    assert [e["n"] for e in events] == list(range(180))
    assert len({e["event_id"] for e in events}) == 180
    assert _failures("outage", "connect") - refused_before >= 3


async def test_a_500_is_retried_with_the_same_events(
    hook: HookServer, outboxes: Callable[..., Outbox]
) -> None:
    box = outboxes("http500")
    before = _failures("http500", "http_5xx")
    hook.plan.append((500, "internal error"))
    await box.append(_docs(0, 4))
    async with sending(box, hook.url):
        await wait_until(lambda: box.pending == 0)  # marked sent only after the 200
    failed, ok = hook.requests
    assert (failed.status, ok.status) == (500, 200)
    assert [e["event_id"] for e in failed.events] == [e["event_id"] for e in ok.events]
    assert failed.signed_with(SECRET) and ok.signed_with(SECRET)
    assert _failures("http500", "http_5xx") - before == 1


async def test_backoff_doubles_while_the_webhook_keeps_failing(
    hook: HookServer, outboxes: Callable[..., Outbox]
) -> None:
    class RecordingClock(SystemClock):
        """Real timestamps; sleeps are recorded and return at once."""

        def __init__(self) -> None:
            self.sleeps: list[float] = []

        async def sleep(self, seconds: float) -> None:
            self.sleeps.append(seconds)
            await asyncio.sleep(0)

    clock = RecordingClock()
    box = outboxes("backoff")
    hook.plan.extend([(503, "busy")] * 8)
    await box.append(_docs(0, 1))
    async with sending(
        box, hook.url, batch_size=1, clock=clock, retry_initial_s=1.0, retry_max_s=30
    ):
        await wait_until(lambda: len(hook.accepted) == 1)
    assert len(hook.requests) == 9
    assert len(clock.sleeps) == 8
    for got, base in zip(clock.sleeps, [1, 2, 4, 8, 16, 30, 30, 30], strict=True):
        assert 0.8 * base <= got <= min(30, 1.2 * base)


@pytest.mark.slow
async def test_an_outage_of_a_few_seconds_costs_a_few_attempts(
    hook: HookServer, outboxes: Callable[..., Outbox]
) -> None:
    box = outboxes("nohotloop")
    hook.stop()
    await box.append(_docs(0, 1))
    async with sending(box, hook.url, retry_initial_s=1.0, retry_max_s=300) as sender:
        await asyncio.sleep(3.0)  # the outage being measured, not a synchronisation
        attempts = sender.attempts
        hook.start()
        await wait_until(lambda: len(hook.accepted) == 1, timeout=15)
    # 1 s, 2 s, 4 s (±20%) apart: at t=0, ~1 and ~3 s
    assert 2 <= attempts <= 4


async def test_a_4xx_is_logged_as_an_error_and_still_retried(
    hook: HookServer, outboxes: Callable[..., Outbox], caplog: pytest.LogCaptureFixture
) -> None:
    box = outboxes("http4xx")
    hook.plan.extend([(429, "slow down"), (400, "\nbad signature\nsecond line")])
    await box.append(_docs(0, 2))
    with caplog.at_level(logging.WARNING, logger="smtpbalancer.events"):
        async with sending(box, hook.url):
            await wait_until(lambda: len(hook.accepted) == 1)
    failed = [r for r in caplog.records if "events.webhook_failed" in r.msg]
    assert [r.levelno for r in failed] == [logging.WARNING, logging.ERROR]  # 429 says "later"
    assert "429 Too Many Requests | slow down" in failed[0].getMessage()
    assert "400 Bad Request | bad signature" in failed[1].getMessage()
    assert "second line" not in failed[1].getMessage()
    assert [e["n"] for e in hook.events()] == [0, 1]


async def test_a_webhook_that_never_answers_times_out_and_is_retried(
    hook: HookServer, outboxes: Callable[..., Outbox]
) -> None:
    box = outboxes("slowhook")
    before = _failures("slowhook", "timeout")
    hook.plan.append((0, ""))  # hold the first request without answering
    await box.append(_docs(0, 1))
    async with sending(box, hook.url, timeout_s=0.3):
        await wait_until(lambda: len(hook.accepted) == 1)
    assert hook.hung == 1
    assert _failures("slowhook", "timeout") - before == 1


async def test_unsent_events_go_after_a_restart(
    tmp_path: Path, hook: HookServer, outboxes: Callable[..., Outbox]
) -> None:
    box = outboxes("restart")
    hook.stop()
    async with sending(box, hook.url, batch_size=7) as sender:
        await box.append(_docs(0, 20))
        await wait_until(lambda: sender.failing >= 1)
    await box.drain()
    box.close()  # everything stopped, nothing sent

    hook.start()
    again = outboxes("restart")  # a new Outbox on the same directory
    assert again.pending == 20
    async with sending(again, hook.url, batch_size=7):
        await wait_until(lambda: again.pending == 0)
    assert [e["n"] for e in hook.events()] == list(range(20))


async def test_sent_segments_are_removed_as_the_sender_goes(
    tmp_path: Path, hook: HookServer, outboxes: Callable[..., Outbox]
) -> None:
    box = outboxes("reclaim", segment_bytes=512)
    for n in range(60):
        await box.append(_docs(n, 1))
    assert len(list((tmp_path / "reclaim").glob("*.log"))) > 5
    async with sending(box, hook.url, batch_size=10):
        # all sent, and every segment but the open one gone
        await wait_until(
            lambda: box.pending == 0 and len(list((tmp_path / "reclaim").glob("*.log"))) <= 1
        )
    assert [e["n"] for e in hook.events()] == list(range(60))


async def test_https_with_a_trusted_ca_and_refused_with_an_unknown_one(
    outboxes: Callable[..., Outbox],
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    server = HookServer(tls=server_ctx)
    server.start()
    try:
        box = outboxes("tls")
        before = _failures("tls", "connect")
        await box.append(_docs(0, 2))
        async with sending(box, server.url) as sender:  # the default context: system CAs
            await wait_until(lambda: sender.failing >= 1)  # which do not know ours
        assert server.accepted == [] and box.pending == 2
        assert _failures("tls", "connect") - before >= 1
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        async with sending(box, server.url, ssl_context=client_ctx):
            await wait_until(lambda: box.pending == 0)
        assert [e["n"] for e in server.events()] == [0, 1]
        assert server.accepted[0].signed_with(SECRET)
    finally:
        server.stop()


def _delivery(recipient: str) -> DeliveryEvent:
    return DeliveryEvent(
        status="bounced",
        queue_id="01A21F78241C38ED53B7",
        message_id="<m1@example.com>",
        sender="esp@example.com",
        recipient=recipient,
        pool="default",
        upstream="relay-a",
        smtp_reply="550 5.1.1 no such user",
        enhanced_status="5.1.1",
        upstream_queue_id="",
        received_at=1_764_291_243.0,
        at=1_764_291_250.0,
        attempt=2,
        headers={"X-Campaign-ID": "c-42"},
    )


async def test_the_event_log_routes_delivery_and_incident_events_to_their_urls(
    tmp_path: Path, hook: HookServer
) -> None:
    base = f"http://127.0.0.1:{hook.port}"
    cfg = EventsConfig(
        webhook_url=f"{base}/delivery",
        incident_url=f"{base}/incident",
        secret=SECRET.decode(),
        flush_interval_s=0.05,
    )
    events = EventLog(cfg, tmp_path / "events", SystemClock())
    events.open()
    events.start()
    try:
        incident = IncidentEvent(kind="breaker_open", at=1_764_291_260.0, upstream="relay-a")
        await events.emit([_delivery("a@example.net"), incident, _delivery("b@example.net")])
        await wait_until(lambda: len(hook.accepted) == 2)
    finally:
        await events.stop()
    by_path = {r.path: r for r in hook.accepted}
    delivered = by_path["/delivery"].events
    assert [e["recipient"] for e in delivered] == ["a@example.net", "b@example.net"]
    assert delivered[0] == {
        "event_id": delivered[0]["event_id"],
        **_delivery("a@example.net").to_json(),
    }
    assert by_path["/incident"].events[0]["kind"] == "breaker_open"
    assert all(r.signed_with(SECRET) for r in hook.accepted)

    await events.emit([_delivery("c@example.net")])  # after stop: dropped, never raised
    assert events.status()["delivery"]["dropped"] == 1


async def test_without_an_incident_url_incidents_are_ignored(
    tmp_path: Path, hook: HookServer
) -> None:
    cfg = EventsConfig(webhook_url=hook.url, secret="s", flush_interval_s=0.05)
    events = EventLog(cfg, tmp_path / "events", SystemClock())
    assert events.wants_delivery and not events.wants_incidents
    events.open()
    events.start()
    try:
        await events.emit([IncidentEvent(kind="backpressure_on", at=1.0), _delivery("a@x.test")])
        await wait_until(lambda: len(hook.accepted) == 1)
    finally:
        await events.stop()
    assert [e["event"] for e in hook.events()] == ["delivery"]
    assert not (tmp_path / "events" / "incident").exists()
    off = EventLog(EventsConfig(), tmp_path / "off", SystemClock())
    off.open()
    off.start()
    await off.emit([_delivery("a@x.test")])  # a no-op
    await off.stop()
    assert not off.enabled and not (tmp_path / "off").exists()


def test_a_url_without_a_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="secret"):
        EventLog(EventsConfig(webhook_url="http://127.0.0.1:9/x"), tmp_path, SystemClock())
