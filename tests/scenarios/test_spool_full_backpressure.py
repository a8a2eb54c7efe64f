"""Every upstream down and a tiny spool: mail is queued until the spool is full, then 452 4.3.1
at MAIL; when an upstream returns, every accepted message is delivered exactly once and MAIL is
admitted again.
"""

from __future__ import annotations

import socket
from pathlib import Path

import aiosmtplib
from support.mail import make_message, message_id_of, send_mail
from support.proxy import config_mapping
from support.waiting import wait_until

from smtpbalancer import config
from smtpbalancer.app import App


def dead_address() -> tuple[str, int]:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return ("127.0.0.1", s.getsockname()[1])


async def test_full_spool_refuses_at_mail_then_drains_exactly_once(tmp_path: Path, sinks) -> None:
    addr = dead_address()
    raw = config_mapping(tmp_path / "spool", [("relay", addr, 1)])
    raw["spool"].update({"max_size": "20KB", "tarpit_above": "0%"})
    async with App(config.from_mapping(raw)) as app:
        port = app.smtp_address[1]
        accepted: list[str] = []
        refusal: aiosmtplib.SMTPSenderRefused | None = None
        for _ in range(30):
            msg_id, body = make_message(size=2000)
            try:
                errors, reply = await send_mail(port, body)
            except aiosmtplib.SMTPSenderRefused as exc:
                refusal = exc
                break
            assert errors == {} and "queued as" in reply
            accepted.append(msg_id)
        assert refusal is not None, "the spool never filled up"
        assert (refusal.code, refusal.message[:5]) == (452, "4.3.1")
        assert 5 <= len(accepted) <= 10
        assert app.store.messages == len(accepted)

        _, body = make_message(size=2000)  # still full: no upstream has taken anything
        try:
            await send_mail(port, body)
        except aiosmtplib.SMTPSenderRefused as exc:
            assert exc.code == 452
        else:
            raise AssertionError("accepted into a full spool")

        sink = await sinks("relay")
        await sink.stop()
        await sink.start(*addr)
        await wait_until(lambda: sink.messages == len(accepted), timeout=20)
        await wait_until(lambda: app.store.messages == 0)
        delivered = [message_id_of(m.data) for m in sink.received]
        assert sorted(delivered) == sorted(accepted)  # each exactly once

        msg_id, body = make_message(size=2000)
        errors, reply = await send_mail(port, body)
        assert errors == {} and "queued as" in reply
        await wait_until(lambda: sink.messages == len(accepted) + 1)
    assert app.dispatcher.bounces == 0
