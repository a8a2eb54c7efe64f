"""Backpressure as an ESP sees it: 452 4.3.1 at MAIL when the spool is full, 421 4.7.0 at
connect over the connection limits, a tarpit before the 250 — and mail again once there is room.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from support.mail import connected_client, make_message
from support.proxy import config_mapping
from support.waiting import wait_until

from smtpbalancer import config
from smtpbalancer.app import App
from smtpbalancer.config import Config


def make_config(
    spool_dir: Path,
    upstreams: list[tuple[str, tuple[str, int], int]],
    spool: dict[str, Any],
    **sections: dict[str, Any],
) -> Config:
    """support.proxy.make_config, plus [spool] keys (its first parameter is named `spool`)."""
    raw = config_mapping(spool_dir, upstreams, **sections)
    raw["spool"].update(spool)
    return config.from_mapping(raw)


def held_sink_rule(held: dict[str, bool]) -> Any:
    """RCPT rule: 451 while held["on"], so delivered mail stays spooled until released."""
    return lambda rcpt: "451 4.3.0 Try again later" if held["on"] else None


async def connect(app: App, source: str = "127.0.0.1") -> aiosmtplib.SMTP:
    return await connected_client(app.smtp_address[1], source)


async def refused_at_mail(client: aiosmtplib.SMTP, size: int) -> tuple[int, str]:
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await client.mail("a@sender.test", options=[f"SIZE={size}"])
    return refused.value.code, refused.value.message


async def send(client: aiosmtplib.SMTP, size: int) -> None:
    _, body = make_message(size=size)
    errors, reply = await client.sendmail("a@sender.test", ["b@rcpt.test"], body)
    assert errors == {} and "queued as" in reply


async def test_size_above_the_room_left_gets_452_4_3_1_until_the_spool_drains(
    tmp_path: Path, sinks
) -> None:
    held = {"on": True}
    relay = await sinks("relay", rcpt_rule=held_sink_rule(held))
    cfg = make_config(
        tmp_path / "spool",
        [("relay", relay.address, 1)],
        {"max_size": "20KB", "tarpit_above": "0%"},
    )
    async with App(cfg) as app:
        client = await connect(app)
        code, message = await refused_at_mail(client, 20_001)  # more than an empty spool holds
        assert (code, message) == (452, "4.3.1 Insufficient system storage, try again later")
        for _ in range(3):
            await send(client, 5000)
        assert app.store.messages == 3 and app.store.bytes > 15_000
        room = 20_000 - app.store.bytes
        assert await refused_at_mail(client, room + 1) == (code, message)
        assert app.store.messages == 3 and app.submitter.accepted == 3  # nothing spooled
        assert app.capacity.reserved_bytes == 0  # a refused MAIL reserves nothing

        held["on"] = False
        await wait_until(lambda: app.store.messages == 0, timeout=15)
        assert relay.messages == 3
        assert (await client.mail("a@sender.test", options=[f"SIZE={room + 1}"])).code == 250
        await client.quit()


async def test_reservation_is_released_on_rset_and_on_disconnect(tmp_path: Path, sinks) -> None:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool",
        [("relay", relay.address, 1)],
        {"max_size": "20KB", "tarpit_above": "0%"},
    )
    async with App(cfg) as app:
        first, second = await connect(app), await connect(app)
        assert (await first.mail("a@sender.test", options=["SIZE=15000"])).code == 250
        assert app.capacity.reserved_bytes == 15_000
        assert (await refused_at_mail(second, 10_000))[0] == 452  # the first holds the room

        await first.rset()
        assert app.capacity.reserved_bytes == 0
        assert (await second.mail("a@sender.test", options=["SIZE=10000"])).code == 250
        assert (await refused_at_mail(first, 15_000))[0] == 452

        second.close()  # hang up mid-transaction, without QUIT
        await wait_until(lambda: app.capacity.reserved_bytes == 0)
        assert (await first.mail("a@sender.test", options=["SIZE=15000"])).code == 250
        await first.quit()
        await wait_until(lambda: app.capacity.reserved_bytes == 0)


async def test_reservation_is_released_at_end_of_data_and_by_the_next_mail(
    tmp_path: Path, sinks
) -> None:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool",
        [("relay", relay.address, 1)],
        {"max_size": "1MB"},
        server={"max_message_size": "20KB"},
    )
    async with App(cfg) as app:
        client = await connect(app)
        await send(client, 3000)  # aiosmtplib declares SIZE= itself
        assert app.capacity.reserved_bytes == 0

        await client.mail("a@sender.test", options=["SIZE=100"])  # a lie: 30 KB follow
        await client.rcpt("b@rcpt.test")
        _, body = make_message(size=30_000)
        with pytest.raises(aiosmtplib.SMTPDataError) as too_big:
            await client.data(body)
        assert too_big.value.code == 552
        assert (await client.mail("a@sender.test", options=["SIZE=200"])).code == 250
        assert app.capacity.reserved_bytes == 200  # the aborted transaction's 100 is gone
        await client.quit()
        await wait_until(lambda: app.capacity.reserved_bytes == 0)


async def test_free_disk_below_the_floor_refuses_everyone_at_mail(tmp_path: Path, sinks) -> None:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool", [("relay", relay.address, 1)], {"min_free_disk": "99.99%"}
    )
    async with App(cfg) as app:
        assert not app.capacity.accepting()
        for source in ("127.0.0.1", "127.0.0.2"):
            client = await connect(app, source)
            code, message = await refused_at_mail(client, 10)
            assert (code, message[:5]) == (452, "4.3.1")
            with pytest.raises(aiosmtplib.SMTPSenderRefused):
                await client.mail("a@sender.test")  # without SIZE= too
            await client.quit()
        assert app.store.messages == 0 and app.submitter.accepted == 0
    assert relay.messages == 0


async def read_refusal(host: str, port: int, source: str) -> bytes:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    line = await reader.readline()
    assert await reader.read() == b""  # and the proxy hung up
    writer.close()
    await writer.wait_closed()
    return line


async def test_connections_over_the_per_client_limit_get_421_4_7_0(
    tmp_path: Path, sinks, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool",
        [("relay", relay.address, 1)],
        {},
        server={"max_connections_per_client": 2},
    )
    async with App(cfg) as app:
        held = [await connect(app), await connect(app)]
        line = await read_refusal(*app.smtp_address, "127.0.0.1")
        assert line == b"421 4.7.0 Too many connections from your host, try again later\r\n"
        assert app.frontend.refused_connections == 1

        other = await connect(app, "127.0.0.2")  # another host is still served
        await send(other, 100)
        await other.quit()

        await held.pop().quit()
        await wait_until(lambda: len(app.frontend.sessions) == 1)
        again = await connect(app)  # a freed slot can be used again
        await send(again, 100)
        for client in (again, *held):
            await client.quit()
        await wait_until(lambda: relay.messages == 2)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_tarpit_holds_the_250_while_the_spool_is_above_the_threshold(
    tmp_path: Path, sinks, caplog: pytest.LogCaptureFixture
) -> None:
    held = {"on": True}
    relay = await sinks("relay", rcpt_rule=held_sink_rule(held))
    cfg = make_config(
        tmp_path / "spool",
        [("relay", relay.address, 1)],
        {"max_size": "10KB", "tarpit_above": "50%", "tarpit_delay": "300ms"},
    )
    caplog.set_level(logging.INFO, logger="smtpbalancer.frontend.handler")
    loop = asyncio.get_running_loop()
    async with App(cfg) as app:
        client = await connect(app)
        await send(client, 3000)  # 30%: no tarpit
        for _ in range(2):  # 60%, then 90%: both held back
            started = loop.time()
            await send(client, 2500)
            assert loop.time() - started >= 0.3
        held["on"] = False
        await wait_until(lambda: app.store.messages == 0, timeout=15)
        await send(client, 100)  # the spool is empty again: no tarpit
        await client.quit()
    events = [r.getMessage().split()[0] for r in caplog.records if "backpressure" in r.msg]
    assert events == ["backpressure.on", "backpressure.off"]  # once each, not per message
