"""Disk faults: corrupt and half-written spool entries, and a write that fails.

Correct behaviour (REFERENCE D2, D5, D6): start anyway; quarantine what fails
validation (metadata at start, bodies when loaded), cut torn tails, delete
unfinished temp files, deliver the valid entries, never deliver garbage; a failed
write answers 451 4.3.0, never 250, and a later smaller message still goes through.
"""

from __future__ import annotations

import resource
import shutil
import sys
from pathlib import Path

import aiosmtplib
import pytest
from support.mail import make_message, message_id_of, send_mail
from support.proxy import config_mapping, make_config, to_toml
from support.waiting import wait_until

from smtpbalancer.app import App
from smtpbalancer.clock import SystemClock
from smtpbalancer.spool import recovery, segment
from smtpbalancer.spool.store import SpoolStore


async def test_corrupt_and_unfinished_entries_are_set_aside_and_the_rest_delivered(
    tmp_path: Path, sinks
) -> None:
    relay = await sinks("relay", rcpt_rule=lambda r: "451 4.3.0 closed for now")
    spool = tmp_path / "spool"
    cfg = make_config(spool, [("relay", relay.address, 1)])
    sent = []
    async with App(cfg) as app:
        for _ in range(4):
            msg_id, body = make_message(size=2000)
            _, reply = await send_mail(app.smtp_address[1], body)
            sent.append((msg_id, reply.split()[-1]))
        slots = [app.store.location(qid) for _, qid in sent]
    assert all(s is not None and s.seq == 1 for s in slots)
    log = segment.log_path(spool / "segments", 1)
    data = bytearray(log.read_bytes())
    meta_hit, body_hit = slots[1], slots[2]
    assert meta_hit is not None and body_hit is not None
    data[meta_hit.offset + meta_hit.head_len - 3] ^= 0x01  # metadata: caught at start
    data[body_hit.offset + body_hit.head_len + 500] ^= 0x01  # body: caught when loaded
    data += data[: slots[0].head_len + 700]  # and a record cut short by a crash
    log.write_bytes(bytes(data))
    # A legacy spool's leftovers: a garbage file with a valid-looking name, a temp file.
    queue = spool / "queue"
    (queue / "0123456789ABCDEF0123").write_bytes(b"garbage\n" * 100)
    (queue / ".tmp-0123456789ABCDEF9999").write_bytes(b"SMTPB1 half written")

    await relay.stop()
    good = await sinks("good")
    await good.stop()
    await good.start(*relay.address)
    async with App(cfg) as app:
        assert app.recovered == 3
        await wait_until(lambda: good.messages == 2)
        await wait_until(lambda: app.store.messages == 0)

    delivered = sorted(message_id_of(m.data) for m in good.received)
    assert delivered == sorted([sent[0][0], sent[3][0]])
    assert sorted(p.name for p in (spool / "quarantine").iterdir()) == sorted(
        [f"0000000001.log@{meta_hit.offset}", sent[2][1], "0123456789ABCDEF0123"]
    )
    assert list(queue.iterdir()) == []
    assert list((spool / "segments").iterdir()) == [], "every record finished: reclaimed"


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics are Linux-specific")
async def test_a_failed_spool_write_is_451_never_250(tmp_path: Path, sinks, proxies) -> None:
    relay = await sinks("relay")
    cfg_path = tmp_path / "proxy.toml"
    cfg_path.write_text(to_toml(config_mapping(tmp_path / "spool", [("relay", relay.address, 1)])))

    def limit_file_size() -> None:  # runs in the child before exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proxy = await proxies(cfg_path, preexec_fn=limit_file_size)
    _, big = make_message(size=200 * 1024)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send_mail(proxy.port, big)
    assert (refused.value.code, refused.value.message[:5]) == (451, "4.3.0")

    small_id, small = make_message(size=1024)
    errors, reply = await send_mail(proxy.port, small)
    assert errors == {} and "queued as" in reply
    await wait_until(lambda: relay.messages == 1)
    assert message_id_of(relay.received[0].data) == small_id
    assert "smtp.spool_failed" in proxy.log()
    # The failed batch was cut back: the segment holds the small message only, and it is
    # marked done (a reader of the running instance's spool sees nothing left).
    segments = list((tmp_path / "spool" / "segments").iterdir())
    assert sum(p.stat().st_size for p in segments if p.suffix == ".log") < 4 * 1024
    view = SpoolStore(tmp_path / "spool", SystemClock())
    await wait_until(lambda: list(recovery.listing(view)) == [])
    view.close()
    shutil.rmtree(tmp_path / "spool")


async def test_a_spool_file_removed_by_hand_is_forgotten_not_retried_forever(
    tmp_path: Path, sinks
) -> None:
    relay = await sinks("relay", rcpt_rule=lambda r: "451 4.3.0 wait")
    cfg = make_config(tmp_path / "spool", [("relay", relay.address, 1)])
    async with App(cfg) as app:
        _, body = make_message()
        await send_mail(app.smtp_address[1], body)
        await wait_until(lambda: app.dispatcher.deferrals >= 1)
        for path in (tmp_path / "spool" / "segments").iterdir():
            path.unlink()
        await wait_until(lambda: app.store.messages == 0, timeout=10)
        assert relay.messages == 0
