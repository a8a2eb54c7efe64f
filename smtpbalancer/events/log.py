"""The event log the dispatcher and the app use: `emit`, and a sender per channel.

Two independent channels, each an Outbox (outbox.py) drained by its own WebhookSender
(webhook.py), so a dead incident endpoint never holds up delivery events:

    <directory>/delivery/   DeliveryEvent  ->  [events] webhook_url
    <directory>/incident/   IncidentEvent  ->  [events] incident_url

A channel whose URL is unset has neither outbox nor sender: its events are ignored, and
with no URL at all the whole log is a no-op. `emit` returns once the events are durable
(fdatasync'd), so an outcome recorded in the spool after it can never lack its event;
it never raises: an outbox that cannot be written loses the events (logged at ERROR,
counted in smtpbalancer_events_dropped_total) rather than holding up mail.

Lifecycle: `open()` (blocking, at startup), `start()` once the loop runs, `await stop()`
at shutdown after the dispatcher has stopped emitting. `[events]` changes need a restart.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smtpbalancer.clock import Clock
from smtpbalancer.config import EventsConfig
from smtpbalancer.events.event import DeliveryEvent, IncidentEvent
from smtpbalancer.events.outbox import DEFAULT_MAX_BYTES, Outbox, OutboxError
from smtpbalancer.events.webhook import WebhookSender
from smtpbalancer.tasks import cancel_and_wait, spawn

log = logging.getLogger(__name__)

DELIVERY = "delivery"
INCIDENT = "incident"


@dataclass(slots=True)
class _Channel:
    outbox: Outbox
    sender: WebhookSender
    task: asyncio.Task[None] | None = None


class EventLog:
    def __init__(
        self,
        cfg: EventsConfig,
        directory: Path,
        clock: Clock,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        """`directory` is where the outboxes live, e.g. `<spool>/events`; `max_bytes`
        bounds each outbox. Raises ValueError if a URL is set without a secret."""
        self._channels: dict[str, _Channel] = {}
        for name, url in ((DELIVERY, cfg.webhook_url), (INCIDENT, cfg.incident_url)):
            if url is None:
                continue
            if not cfg.secret:
                raise ValueError("[events] needs a secret to sign webhook requests")
            outbox = Outbox(directory / name, clock, name=name, max_bytes=max_bytes)
            sender = WebhookSender(
                outbox,
                url,
                cfg.secret,
                batch_size=cfg.batch_size,
                flush_interval_s=cfg.flush_interval_s,
                timeout_s=cfg.timeout_s,
                retry_max_s=cfg.retry_max_s,
                clock=clock,
                ssl_context=ssl_context,
            )
            self._channels[name] = _Channel(outbox, sender)

    def __repr__(self) -> str:
        parts = " ".join(
            f"{n}={c.outbox.pending}/{c.sender.state}" for n, c in self._channels.items()
        )
        return f"<EventLog {parts or 'off'}>"

    @property
    def enabled(self) -> bool:
        return bool(self._channels)

    @property
    def wants_delivery(self) -> bool:
        """Whether delivery events go anywhere (callers may skip building them)."""
        return DELIVERY in self._channels

    @property
    def wants_incidents(self) -> bool:
        return INCIDENT in self._channels

    def open(self) -> None:
        """Open the outboxes: index what earlier runs left unsent. Blocking; raises
        OutboxError if one cannot be opened (its directory is unusable or locked)."""
        opened: list[Outbox] = []
        try:
            for channel in self._channels.values():
                channel.outbox.open()
                opened.append(channel.outbox)
        except OutboxError:
            for outbox in opened:
                outbox.close()
            raise

    def start(self) -> None:
        """Start one sender task per channel (call from the running loop, after open)."""
        for name, channel in self._channels.items():
            if channel.task is None:
                channel.task = spawn(channel.sender.run(), name=f"webhook:{name}")

    async def stop(self) -> None:
        """Stop the senders (a batch in flight stays unsent and goes after the restart),
        finish the appends under way and close the outboxes."""
        tasks = [c.task for c in self._channels.values() if c.task is not None]
        await cancel_and_wait(tasks)
        for channel in self._channels.values():
            channel.task = None
            await channel.outbox.drain()
            await asyncio.to_thread(channel.outbox.close)

    async def emit(self, events: Iterable[DeliveryEvent | IncidentEvent]) -> None:
        """Durably record events for their webhooks; returns once they are on disk.
        Never raises: events that cannot be written are logged and counted as dropped."""
        docs: dict[str, list[dict[str, Any]]] = {DELIVERY: [], INCIDENT: []}
        for event in events:
            docs[DELIVERY if isinstance(event, DeliveryEvent) else INCIDENT].append(event.to_json())
        for name, batch in docs.items():
            channel = self._channels.get(name)
            if channel is None or not batch:
                continue
            try:
                await channel.outbox.append(batch)
            except OutboxError as exc:
                channel.outbox.count_dropped(len(batch))
                log.error(
                    "events.emit_failed outbox=%s events=%d errno=%s", name, len(batch), exc.errno
                )

    def status(self) -> dict[str, dict[str, object]]:
        """Per channel: events pending and dropped, and the sender's state (for /status)."""
        return {
            name: {
                "pending": c.outbox.pending,
                "dropped": c.outbox.dropped,
                "sender": str(c.sender.state),
                "failing_attempts": c.sender.failing,
            }
            for name, c in self._channels.items()
        }
