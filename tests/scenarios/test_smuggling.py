"""SMTP smuggling (CVE-2023-51764/51765/51766): a fake end-of-data in the body stays body.

Each variant below ends DATA on some server somewhere. Through the proxy, only
<CRLF>.<CRLF> ends DATA; the look-alike is normalised to CRLF at receipt and
dot-stuffed when relayed, so the upstream sees one message, never a second
transaction from evil@x.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.proxy import make_config
from support.raw import RawClient
from support.waiting import wait_until

from smtpbalancer.app import App
from smtpbalancer.clock import SystemClock
from smtpbalancer.envelope import Envelope
from smtpbalancer.spool.store import SpoolStore

SMUGGLED = (
    b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
)
VARIANTS = [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r"]


@pytest.mark.parametrize("fake_end", VARIANTS, ids=lambda v: repr(v)[2:-1])
async def test_fake_end_of_data_does_not_smuggle_a_second_message(
    tmp_path: Path, sinks, fake_end: bytes
) -> None:
    sink = await sinks("relay")
    cfg = make_config(tmp_path / "spool", [("relay", sink.address, 1)])
    async with App(cfg) as app:
        client = await RawClient.open(app.smtp_address)
        await client.send(
            b"EHLO client.test\r\nMAIL FROM:<esp@sender.test>\r\nRCPT TO:<reader@rcpt.test>\r\n"
            b"DATA\r\n"
        )
        assert (await client.reply()).startswith("250-")
        assert (await client.reply()).startswith("250 2.1.0")
        assert (await client.reply()).startswith("250 2.1.5")
        assert (await client.reply()).startswith("354")
        body = b"From: esp@sender.test\r\nSubject: real\r\n\r\nhello" + fake_end + SMUGGLED
        await client.send(body + b"QUIT\r\n")  # SMUGGLED ends with the real <CRLF>.<CRLF>
        rest = (await client.until_eof()).decode()
        await client.close()
        replies = rest.splitlines()
        assert [r for r in replies if r.startswith("250")] == [replies[0]], rest
        assert replies[0].startswith("250 2.0.0 Ok: queued as ")
        assert replies[1:] == ["221 2.0.0 Bye"], rest
        await wait_until(lambda: sink.messages >= 1 and app.store.messages == 0)

    assert sink.messages == 1
    got = sink.received[0]
    assert got.mail_from == "esp@sender.test"
    assert got.rcpt_tos == ("reader@rcpt.test",)
    # The look-alike and the smuggled commands arrive as body text, with CRLF only.
    assert b"MAIL FROM:<evil@x>\r\n" in got.data
    assert got.data.count(b"\r") == got.data.count(b"\n") == got.data.count(b"\r\n")
    assert not any(m.mail_from == "evil@x" for m in sink.received)


async def test_a_body_spooled_without_normalisation_still_leaves_with_crlf_only(
    tmp_path: Path, sinks
) -> None:
    """Only the front end normalises line ends; a body that reached the spool another way
    (an older version's spool) is read back cold, and the relay client rewrites it."""
    spool = tmp_path / "spool"
    store = SpoolStore(spool, SystemClock())
    store.open()
    raw = b"Subject: old\r\n\r\nbare lf\n.dot after a bare lf\nbare cr\r" + SMUGGLED
    await store.store(Envelope("esp@sender.test", ("reader@rcpt.test",)), raw)
    store.close()
    sink = await sinks("relay")
    async with App(make_config(spool, [("relay", sink.address, 1)])) as app:
        assert app.recovered == 1
        await wait_until(lambda: sink.messages >= 1 and app.store.messages == 0)
    assert sink.messages == 1 and sink.received[0].mail_from == "esp@sender.test"
    got = sink.received[0].data
    assert got.count(b"\r") == got.count(b"\n") == got.count(b"\r\n"), got
    assert b"bare lf\r\n.dot after a bare lf\r\nbare cr\r\nMAIL FROM:<evil@x>\r\n" in got
