"""PROXY protocol v1/v2 from a trusted balancer: the real client drives policy and trace."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

from support.proxy import make_config
from support.raw import RawClient
from support.waiting import wait_until

from smtpbalancer.app import App

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(client: str) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 5555 25\r\n".encode()


def v2(client: str) -> bytes:
    addresses = ipaddress.IPv4Address(client).packed + ipaddress.IPv4Address("127.0.0.1").packed
    payload = addresses + struct.pack("!HH", 5555, 25)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(payload)) + payload


def config(tmp_path: Path, sink_address: tuple[str, int], trusted: str):
    return make_config(
        tmp_path / "spool",
        [("relay", sink_address, 1)],
        server={
            "proxy_protocol": True,
            "trusted_proxies": [trusted],
            "allow_networks": ["203.0.113.0/24"],
        },
    )


async def transaction(app: App, header: bytes) -> list[str]:
    client = await RawClient.open(app.smtp_address, greet=False)
    await client.send(header)
    replies = [await client.reply()]
    for line in (b"EHLO balanced.test", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<b@rcpt.test>"):
        replies.append(await client.command(line))
    if replies[-1].startswith("250"):
        replies.append(await client.command(b"DATA"))
        replies.append(await client.command(b"Subject: proxied\r\n\r\nhi\r\n."))
    replies.append(await client.command(b"QUIT"))
    await client.close()
    return replies


async def test_proxied_clients_relay_by_their_own_address(tmp_path: Path, sinks) -> None:
    sink = await sinks("relay")
    async with App(config(tmp_path, sink.address, "127.0.0.1/32")) as app:
        for header in (v1("203.0.113.7"), v2("203.0.113.8")):
            replies = await transaction(app, header)
            assert replies[0].startswith("220 ")
            assert replies[-2].startswith("250 2.0.0 Ok: queued as "), replies
        await wait_until(lambda: sink.messages == 2)
    traces = sorted(m.data.split(b"\r\n", 1)[0] for m in sink.received)
    assert traces == [
        b"Received: from balanced.test ([203.0.113.7])",
        b"Received: from balanced.test ([203.0.113.8])",
    ]


async def test_proxied_client_outside_allow_networks_is_denied(tmp_path: Path, sinks) -> None:
    sink = await sinks("relay")
    async with App(config(tmp_path, sink.address, "127.0.0.1/32")) as app:
        for header in (v1("198.51.100.9"), v2("198.51.100.9")):
            replies = await transaction(app, header)
            assert replies[3].startswith("554 5.7.1 "), replies
        assert app.submitter.accepted == 0
    assert sink.messages == 0


async def test_header_from_an_untrusted_peer_is_refused(tmp_path: Path, sinks) -> None:
    sink = await sinks("relay")
    async with App(config(tmp_path, sink.address, "10.0.0.0/8")) as app:
        for header in (v1("203.0.113.7"), v2("203.0.113.7"), b"EHLO direct.test\r\n"):
            client = await RawClient.open(app.smtp_address, greet=False)
            await client.send(header)
            assert (await client.until_eof()).startswith(b"421 4.7.0 ")
            await client.close()
        assert app.submitter.accepted == 0
    assert sink.messages == 0


async def test_trusted_peer_without_a_header_is_closed_silently(tmp_path: Path, sinks) -> None:
    sink = await sinks("relay")
    async with App(config(tmp_path, sink.address, "127.0.0.1/32")) as app:
        client = await RawClient.open(app.smtp_address, greet=False)
        await client.send(b"EHLO direct.test\r\nMAIL FROM:<a@sender.test>\r\n")
        assert await client.until_eof() == b""
        await client.close()
        assert app.submitter.accepted == 0
