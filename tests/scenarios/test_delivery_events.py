"""Delivery events for the ESP, end to end: real SMTP in, a real webhook endpoint out.

Per recipient the ESP learns what happened (delivered with the upstream's queue id,
deferred, bounced, expired) in signed, batched POSTs; an unreachable webhook loses no
events; incidents (a breaker opening) go to their own URL.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.mail import make_message, send_mail
from support.proxy import make_config
from support.waiting import wait_until
from support.webhook import HookServer

from smtpbalancer.app import App

SECRET = "whsec_test_secret"


@pytest.fixture
async def hooks() -> AsyncIterator[tuple[HookServer, HookServer]]:
    deliveries, incidents = HookServer(), HookServer()
    deliveries.start()
    incidents.start()
    yield deliveries, incidents
    await asyncio.to_thread(deliveries.stop)
    await asyncio.to_thread(incidents.stop)


def events_config(tmp_path: Path, deliveries: HookServer, incidents: HookServer) -> dict:
    secret = tmp_path / "webhook.key"
    secret.write_text(SECRET + "\n")
    return {
        "webhook_url": deliveries.url,
        "incident_url": incidents.url,
        "secret_file": str(secret),
        "batch_size": 50,
        "flush_interval": "100ms",
        "retry_max": "500ms",
        "copy_headers": ["X-Campaign-ID"],
    }


async def test_every_recipient_outcome_reaches_the_webhook_signed_and_batched(
    tmp_path: Path, sinks, hooks: tuple[HookServer, HookServer]
) -> None:
    deliveries, incidents = hooks
    tries = itertools.count()

    def rcpt_rule(address: str) -> str | None:
        if address.startswith("gone@"):
            return "550 5.1.1 No such user"
        if address.startswith("later@") and next(tries) == 0:
            return "451 4.2.0 Try later"
        return None

    relay = await sinks("ev", rcpt_rule=rcpt_rule)
    cfg = make_config(
        tmp_path / "spool",
        [("ev", relay.address, 1)],
        events=events_config(tmp_path, deliveries, incidents),
    )
    async with App(cfg) as app:
        msg_id, body = make_message()
        body = b"X-Campaign-ID: spring-42\r\n" + body
        rcpts = ["ok@rcpt.test", "gone@rcpt.test", "later@rcpt.test"]
        await send_mail(app.smtp_address[1], body, rcpts=rcpts)
        await wait_until(lambda: app.store.messages == 0)
        want = {("ok", "delivered"), ("gone", "bounced"), ("later", "deferred")}
        want |= {("later", "delivered"), ("esp", "delivered")}  # the DSN reaches the sender too
        await wait_until(
            lambda: (
                {(e["recipient"].split("@")[0], e["status"]) for e in deliveries.events()} >= want
            ),
            timeout=10,
        )
    assert all(r.signed_with(SECRET.encode()) for r in deliveries.accepted)
    mine = [e for e in deliveries.events() if e["message_id"] == msg_id]
    by = {(e["recipient"], e["status"]): e for e in mine}
    ok = by[("ok@rcpt.test", "delivered")]
    assert ok["upstream"] == "ev" and ok["pool"] == "default" and ok["sender"] == "esp@sender.test"
    assert ok["upstream_queue_id"] and ok["smtp_reply"].startswith("250")
    assert ok["headers"] == {"X-Campaign-ID": "spring-42"}
    assert by[("gone@rcpt.test", "bounced")]["smtp_reply"] == "550 5.1.1 No such user"
    assert by[("gone@rcpt.test", "bounced")]["enhanced_status"] == "5.1.1"
    assert by[("later@rcpt.test", "deferred")]["smtp_reply"].startswith("451")
    assert by[("later@rcpt.test", "delivered")]["attempt"] == 2
    assert len({e["event_id"] for e in deliveries.events()}) == len(deliveries.events())
    print("sample events:", *mine[:3], sep="\n")


async def test_an_unreachable_webhook_loses_no_events_and_incidents_have_their_own_url(
    tmp_path: Path, sinks, hooks: tuple[HookServer, HookServer]
) -> None:
    deliveries, incidents = hooks
    await asyncio.to_thread(deliveries.stop)  # the ESP's endpoint is down
    good = await sinks("ev-good")
    bad = await sinks("ev-bad", mail_rule=lambda _: "451 4.3.0 Relay unavailable")
    cfg = make_config(
        tmp_path / "spool",
        [("ev-good", good.address, 1), ("ev-bad", bad.address, 1)],
        events=events_config(tmp_path, deliveries, incidents),
        circuit_breaker={"failure_threshold": 2, "open_for": "30s"},
    )
    async with App(cfg) as app:
        sent = []
        for _ in range(40):
            msg_id, body = make_message()
            await send_mail(app.smtp_address[1], body)
            sent.append(msg_id)
        await wait_until(lambda: good.messages == 40 and app.store.messages == 0, timeout=15)
        await wait_until(lambda: any(e["kind"] == "breaker_open" for e in incidents.events()))
        assert app.events.status()["delivery"]["pending"] >= 40  # kept on disk meanwhile
        await asyncio.to_thread(deliveries.start)  # back, on the same port
        await wait_until(
            lambda: (
                {e["message_id"] for e in deliveries.events() if e["status"] == "delivered"}
                >= set(sent)
            ),
            timeout=15,
        )
    opened = next(e for e in incidents.events() if e["kind"] == "breaker_open")
    assert opened["upstream"] == "ev-bad" and opened["pool"] == "default"
    assert all(r.signed_with(SECRET.encode()) for r in incidents.accepted)
