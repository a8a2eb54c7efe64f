"""Building and sending test messages with real SMTP clients."""

from __future__ import annotations

import email
import email.policy
import itertools
from collections.abc import Sequence

import aiosmtplib

_serial = itertools.count(1)


def make_message(
    *,
    subject: str = "test",
    size: int = 200,
    msg_id: str | None = None,
    sender: str = "esp@sender.test",
) -> tuple[str, bytes]:
    """A small RFC 5322 message with a unique Message-ID; returns (message_id, bytes)."""
    msg_id = msg_id or f"<t{next(_serial)}.{id(subject)}@tests.smtpbalancer>"
    filler = ("The quick brown fox jumps over the lazy dog.\r\n" * (size // 46 + 1))[:size]
    text = (
        f"From: {sender}\r\nTo: someone@rcpt.test\r\nSubject: {subject}\r\n"
        f"Message-ID: {msg_id}\r\n\r\n{filler}\r\n.leading dot line\r\nend\r\n"
    )
    return msg_id, text.encode()


def message_id_of(data: bytes) -> str:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return str(msg.get("Message-ID", ""))


async def send_mail(
    port: int,
    body: bytes,
    *,
    sender: str = "esp@sender.test",
    rcpts: Sequence[str] = ("someone@rcpt.test",),
    host: str = "127.0.0.1",
    source_address: tuple[str, int] | None = None,
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    client = aiosmtplib.SMTP(
        hostname=host, port=port, start_tls=False, timeout=15, source_address=source_address
    )
    await client.connect()
    try:
        return await client.sendmail(sender, list(rcpts), body)
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()


async def connected_client(port: int, source: str = "127.0.0.1") -> aiosmtplib.SMTP:
    """An aiosmtplib client from `source` (any 127/8 address), connected and past EHLO."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, timeout=5, source_address=(source, 0)
    )
    await client.connect()
    await client.ehlo(hostname="client.test")
    return client
