"""What an event says: one recipient's outcome, or an incident. Pure data, no I/O.

A delivery event is emitted for every recipient outcome (delivered with the upstream's
queue id, deferred, bounced, expired); the ESP learns per recipient what happened
without parsing DSNs. Incident events (a breaker opening or closing, all relays down,
backpressure on or off) are for the "notify stakeholders" step of an incident.

The JSON shape is a public contract: add fields, never rename them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

DELIVERED: Final = "delivered"
DEFERRED: Final = "deferred"
BOUNCED: Final = "bounced"
EXPIRED: Final = "expired"
STATUSES: Final = (DELIVERED, DEFERRED, BOUNCED, EXPIRED)


def rfc3339(wall: float) -> str:
    """UTC with milliseconds, e.g. 2026-11-28T01:02:03.456Z."""
    return (
        datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    status: str  # one of STATUSES
    queue_id: str
    message_id: str  # the Message-ID header, "" when the message had none
    sender: str  # envelope sender ("" for <>)
    recipient: str
    pool: str
    upstream: str  # "" when no upstream was involved (expired)
    smtp_reply: str  # the upstream's reply line, or ours for an expiry
    enhanced_status: str  # RFC 3463, e.g. "2.0.0", "5.1.1", "4.4.7"
    upstream_queue_id: str  # from the upstream's 250 reply, "" when it named none
    received_at: float  # wall time the proxy accepted the message
    at: float  # wall time of this outcome
    attempt: int  # 1 for the first delivery attempt
    headers: Mapping[str, str] = field(default_factory=dict)  # [events] copy_headers

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "delivery",
            "status": self.status,
            "queue_id": self.queue_id,
            "message_id": self.message_id,
            "sender": self.sender,
            "recipient": self.recipient,
            "pool": self.pool,
            "upstream": self.upstream,
            "smtp_reply": self.smtp_reply,
            "enhanced_status": self.enhanced_status,
            "upstream_queue_id": self.upstream_queue_id,
            "received_at": rfc3339(self.received_at),
            "timestamp": rfc3339(self.at),
            "attempt": self.attempt,
            "headers": dict(self.headers),
        }


@dataclass(frozen=True, slots=True)
class IncidentEvent:
    kind: str  # breaker_open, breaker_closed, all_upstreams_down, all_upstreams_up,
    #            backpressure_on, backpressure_off
    at: float
    upstream: str = ""
    pool: str = ""
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "incident",
            "kind": self.kind,
            "upstream": self.upstream,
            "pool": self.pool,
            "detail": self.detail,
            "timestamp": rfc3339(self.at),
        }
