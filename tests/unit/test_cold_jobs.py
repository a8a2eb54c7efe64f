"""A queued message keeps only an index entry in memory; its envelope is read back."""

from __future__ import annotations

import sys
from pathlib import Path

from smtpbalancer.clock import SystemClock
from smtpbalancer.delivery.scheduler import NO_AVOID, Job
from smtpbalancer.envelope import Envelope
from smtpbalancer.spool import recovery
from smtpbalancer.spool.record import NO_PROGRESS
from smtpbalancer.spool.store import SpoolStore

ENV = Envelope(
    "esp@sender.test",
    ("a@rcpt.test", "b@rcpt.test"),
    smtputf8=True,
    pool="bulk",
    message_id="<1@sender.test>",
    tags=(("X-Campaign", "7"),),
)


def opened(spool: Path) -> tuple[SpoolStore, recovery.Recovered]:
    store = SpoolStore(spool, SystemClock())
    store.open()
    return store, recovery.scan(store)


async def test_load_reads_metadata_and_body_back_in_one_go(tmp_path: Path) -> None:
    store, _ = opened(tmp_path)
    meta = await store.store(ENV, b"Subject: x\r\n\r\nbody\r\n", client="192.0.2.1")
    assert await store.load(meta.queue_id) == (meta, b"Subject: x\r\n\r\nbody\r\n")
    store.close()


async def test_recovery_returns_the_stored_metadata_in_arrival_order(tmp_path: Path) -> None:
    store, _ = opened(tmp_path)
    metas = [await store.store(ENV, b"m%d" % i) for i in range(5)]
    await store.remove(metas[2])
    store.close()
    store, found = opened(tmp_path)
    assert [m for m, _ in found.messages] == [m for i, m in enumerate(metas) if i != 2]
    assert all(p is NO_PROGRESS for _, p in found.messages)
    # The index shares the recovered objects (nothing per message is made twice).
    meta = found.messages[0][0]
    slot = store.location(meta.queue_id)
    assert slot is not None and slot.received_wall is meta.received_wall
    assert store.oldest_arrival() == metas[0].received_wall
    store.close()


def test_a_fresh_job_shares_its_empty_defaults() -> None:
    from smtpbalancer.spool.record import MessageMeta

    job = Job(MessageMeta("0" * 20, ENV, 1.0, 3))
    assert job.avoid is NO_AVOID and job.progress is NO_PROGRESS and job.last_reply is None
    assert not hasattr(job, "__dict__")
    assert sys.getsizeof(job) <= 120


def test_a_record_only_the_full_decode_rejects_is_quarantined(tmp_path: Path) -> None:
    import json
    import zlib

    from smtpbalancer.spool import segment

    body = b"body"
    meta = json.dumps({"id": "0" * 20, "rcpts": ["a@b.test"], "received": 1.0, "size": 4})
    raw = meta.encode()  # checksums fine, JSON fine, no "from": only decode_meta says no
    head = b"SMTPB1 %d %d %08x %08x\n" % (len(raw), len(body), zlib.crc32(raw), zlib.crc32(body))
    (tmp_path / "segments").mkdir()
    (tmp_path / "segments" / "0000000001.log").write_bytes(head + raw + body)
    store, found = opened(tmp_path)
    assert (found.messages, found.quarantined, store.messages) == ([], 1, 0)
    assert (tmp_path / "quarantine" / "0000000001.log@0").read_bytes() == head + raw + body
    done = segment.read_done(segment.done_path(tmp_path / "segments", 1))
    assert done.offsets == {0}
    store.close()


def test_peek_reads_our_records_like_the_full_decode() -> None:
    from smtpbalancer.spool import record
    from smtpbalancer.spool.record import MessageMeta

    tricky = Envelope('x",\\"received\\":5,"@b.test', ('a",,"received":7@c.test',))
    for env in (ENV, tricky):
        meta = MessageMeta("0197A1B2C3D4E5F60718", env, 1_750_000_000.123456, 4, "c", 0)
        head = record.encode_prefix(meta, 4, 0)
        frame = record.parse_frame(head)
        assert frame is not None
        raw = head[frame.line_len :]
        assert record.peek_meta("n", frame, raw) == (meta.queue_id, meta.received_wall)
        assert record.decode_meta("n", frame, raw, expect_id=False) == meta
