"""The spool record keeps what routing and events need: pool, Message-ID, copied headers."""

from __future__ import annotations

from smtpbalancer.envelope import Envelope
from smtpbalancer.spool import record
from smtpbalancer.spool.record import MessageMeta

BODY = b"Subject: s\r\n\r\nbody\r\n"


def round_trip(envelope: Envelope) -> Envelope:
    meta = MessageMeta("0123456789ABCDEF0123", envelope, 1_700_000_000.5, len(BODY), "10.0.0.1")
    prefix, _ = record.encode_message(meta, BODY)
    return record.decode_message_head(meta.queue_id, prefix).meta.envelope


def test_pool_message_id_and_tags_survive_the_spool() -> None:
    env = Envelope(
        "esp@sender.test",
        ("a@rcpt.test",),
        pool="transactional",
        message_id="<m1@esp.test>",
        tags=(("X-Campaign-ID", "spring-42"),),
    )
    assert round_trip(env) == env


def test_records_without_them_read_as_the_default_pool() -> None:
    env = Envelope("esp@sender.test", ("a@rcpt.test",))
    decoded = round_trip(env)
    assert (decoded.pool, decoded.message_id, decoded.tags) == ("default", "", ())
