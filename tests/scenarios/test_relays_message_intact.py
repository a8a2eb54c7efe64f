"""A message relayed through the proxy arrives byte-identical, plus one Received: line."""

from __future__ import annotations

from pathlib import Path

from support.mail import make_message, send_mail
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App


async def test_body_arrives_byte_identical_with_a_trace_header(tmp_path: Path, sinks) -> None:
    sink = await sinks("relay-a")
    cfg = make_config(tmp_path / "spool", [("relay-a", sink.address, 1)])
    async with App(cfg) as app:
        _, body = make_message(size=3000)
        errors, reply = await send_mail(
            app.smtp_address[1], body, rcpts=["one@rcpt.test", "two@rcpt.test"]
        )
        assert errors == {}
        assert reply.startswith("2.0.0 Ok: queued as ")
        queue_id = reply.rsplit(" ", 1)[1]
        await wait_until(lambda: sink.messages == 1)
        await wait_until(lambda: app.store.messages == 0)

    got = sink.received[0]
    assert got.mail_from == "esp@sender.test"
    assert got.rcpt_tos == ("one@rcpt.test", "two@rcpt.test")
    trace, _, rest = got.data.partition(b"\r\n\t")
    assert trace.startswith(b"Received: from ")
    assert rest.split(b"\r\n", 1)[1] == body, "body must be byte-identical after the trace header"
    assert f"id {queue_id}".encode() in got.data.split(b"\r\n\r\n")[0]
    assert b"by proxy.test (smtpbalancer)" in got.data
    assert list((tmp_path / "spool" / "queue").iterdir()) == []
