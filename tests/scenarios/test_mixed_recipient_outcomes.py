"""Per-recipient fates: 250 / 550 / 450-then-250 in one message, and lifetime expiry.

The good recipients are each delivered exactly once, the 450 one in a later
transaction of its own; exactly one RFC 3464 DSN goes back to the sender and
names only the recipient that failed for good.
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from support.mail import make_message, send_mail
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App

SENDER = "esp@sender.test"


class FlipFlop:
    """good@ -> 250, bad@ -> 550, later@ -> 450 the first time, then 250."""

    def __init__(self) -> None:
        self.later_seen = 0

    def __call__(self, rcpt: str) -> str | None:
        if rcpt.startswith("bad@"):
            return "550 5.1.1 <bad@rcpt.test>: Recipient address rejected: User unknown"
        if rcpt.startswith("later@"):
            self.later_seen += 1
            if self.later_seen == 1:
                return "450 4.2.0 <later@rcpt.test>: mailbox busy"
        return None


def dsn_parts(data: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return msg, msg.get_payload()  # type: ignore[return-value]


async def test_250_550_450_then_250_gives_one_delivery_each_and_one_dsn(
    tmp_path: Path, sinks
) -> None:
    relay = await sinks("relay", rcpt_rule=FlipFlop())
    cfg = make_config(tmp_path / "spool", [("relay", relay.address, 1)])
    async with App(cfg) as app:
        _, body = make_message(subject="three recipients")
        errors, _ = await send_mail(
            app.smtp_address[1],
            body,
            sender=SENDER,
            rcpts=["good@rcpt.test", "bad@rcpt.test", "later@rcpt.test"],
        )
        assert errors == {}, "the proxy accepts every recipient and owns the bounce"
        await wait_until(lambda: app.store.messages == 0 and app.dispatcher.bounces == 1)
        await wait_until(lambda: any(m.mail_from == "" for m in relay.received))

    originals = [m for m in relay.received if m.mail_from == SENDER]
    delivered = [r for m in originals for r in m.rcpt_tos]
    assert sorted(delivered) == ["good@rcpt.test", "later@rcpt.test"]
    assert [m.rcpt_tos for m in originals] == [("good@rcpt.test",), ("later@rcpt.test",)]

    bounces = [m for m in relay.received if m.mail_from == ""]
    assert len(bounces) == 1
    assert bounces[0].rcpt_tos == (SENDER,)
    msg, parts = dsn_parts(bounces[0].data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; bad@rcpt.test" in status
    assert "Action: failed" in status
    assert "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1" in status
    assert "good@rcpt.test" not in status and "later@rcpt.test" not in status


async def test_expired_recipients_bounce_with_4_4_7_and_bounces_never_bounce(
    tmp_path: Path, sinks
) -> None:
    relay = await sinks(
        "relay", rcpt_rule=lambda r: "451 4.4.1 still no luck" if r.endswith("@slow.test") else None
    )
    cfg = make_config(
        tmp_path / "spool",
        [("relay", relay.address, 1)],
        delivery={"max_lifetime": "1s", "retry_initial": "200ms", "retry_max": "300ms"},
    )
    async with App(cfg) as app:
        _, body = make_message()
        await send_mail(app.smtp_address[1], body, sender=SENDER, rcpts=["x@slow.test"])
        _, bounce_body = make_message()
        await send_mail(app.smtp_address[1], bounce_body, sender="", rcpts=["y@slow.test"])
        await wait_until(lambda: app.store.messages == 0, timeout=10)

    bounces = [m for m in relay.received if m.mail_from == ""]
    assert len(bounces) == 1, "one DSN for the expired message, none for the null-sender one"
    assert bounces[0].rcpt_tos == (SENDER,)
    status = dsn_parts(bounces[0].data)[1][1].as_string()
    assert "Final-Recipient: rfc822; x@slow.test" in status
    assert "Status: 4.4.7" in status
    assert "y@slow.test" not in status
