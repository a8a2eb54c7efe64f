"""aiosmtpd hooks: EHLO extensions, relay and limit checks, and the spool hand-off.

The handler owns per-session policy; it never imports spool, delivery or
upstream (it gets a Submitter from app). DATA is answered 250 only after
`Submitter.submit` returns, i.e. after body and envelope are durable
(invariant 1); a spool failure answers 451 4.3.0.
"""

from __future__ import annotations

import email.utils
import logging
from typing import Any, Protocol

from smtpbalancer import replies
from smtpbalancer.clock import Clock
from smtpbalancer.envelope import Envelope
from smtpbalancer.errors import SpoolError
from smtpbalancer.frontend import admission
from smtpbalancer.frontend.admission import Limits

log = logging.getLogger(__name__)


class Submitter(Protocol):
    def next_queue_id(self) -> str: ...

    async def submit(self, queue_id: str, envelope: Envelope, body: bytes, client: str) -> None:
        """Returns once the message is durable; raises SpoolError otherwise."""


class Handler:
    def __init__(
        self, *, hostname: str, limits: Limits, submitter: Submitter, clock: Clock
    ) -> None:
        self._hostname = hostname
        self._limits = limits
        self._submitter = submitter
        self._clock = clock

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must record it itself
        extensions = [r[4:] for r in responses[1:] if r[4:] != "HELP"]
        extensions += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        lines = [responses[0]] + [f"250-{e}" for e in extensions[:-1]]
        return [*lines, f"250 {extensions[-1]}"]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if admission.has_control_chars(address):
            return replies.BAD_ADDRESS.line
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return replies.OK_SENDER.line

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if admission.has_control_chars(address):
            return replies.BAD_ADDRESS.line
        client_ip = _peer_ip(session)
        refusal = admission.on_rcpt(self._limits, client_ip, len(envelope.rcpt_tos))
        if refusal is not None:
            if refusal is replies.RELAY_DENIED:
                log.warning(
                    "smtp.relay_denied client=%s rcpt_domain=%s",
                    client_ip,
                    address.rpartition("@")[2][:100],
                )
            return refusal.line
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)
        return replies.OK_RECIPIENT.line

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content
        client_ip = _peer_ip(session)
        mail_from = envelope.mail_from or ""
        if mail_from == "<>":
            mail_from = ""
        env = Envelope(
            mail_from=mail_from,
            rcpt_tos=tuple(dict.fromkeys(envelope.rcpt_tos)),  # RCPT twice = one recipient
            smtputf8=bool(envelope.smtp_utf8),
            body_8bit="BODY=8BITMIME" in envelope.mail_options,
        )
        queue_id = self._submitter.next_queue_id()
        trace = self._received(session, client_ip, queue_id, env)
        try:
            await self._submitter.submit(queue_id, env, trace + content, client_ip)
        except SpoolError as exc:
            log.error("smtp.spool_failed client=%s error=%s", client_ip, exc)
            return replies.SPOOL_WRITE_FAILED.line
        return replies.queued(queue_id)

    def _received(self, session: Any, client_ip: str, queue_id: str, env: Envelope) -> bytes:
        """RFC 5321 §4.4 trace header; the EHLO name is sanitised (invariant 7)."""
        helo = admission.trace_name(session.host_name)
        protocol = "UTF8SMTP" if env.smtputf8 else ("ESMTP" if session.extended_smtp else "SMTP")
        date = email.utils.formatdate(self._clock.wall(), usegmt=True)
        for_clause = ""
        if len(env.rcpt_tos) == 1:
            for_clause = f"\r\n\tfor <{env.rcpt_tos[0]}>"
        text = (
            f"Received: from {helo} ([{client_ip}])\r\n\tby {self._hostname} (smtpbalancer)"
            f" with {protocol} id {queue_id}{for_clause}; {date}\r\n"
        )
        return text.encode("utf-8", "surrogateescape")


def _peer_ip(session: Any) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"
