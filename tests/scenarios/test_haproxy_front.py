"""Scale-out: real HAProxy (deploy/haproxy/haproxy.cfg as is) in front of two instances.

Two `smtpbalancer serve` processes, each with its own spool, PROXY protocol on and
HAProxy's address as their only trusted proxy, relay to two slow sinks (so a backlog
builds). Clients connect through HAProxy from 127.0.0.5; HAProxy connects to the
instances from 127.0.0.9, which is trusted but not in allow_networks, so a message is
accepted only if the instance sees the real client. The scenario proves, in order:

1. a sustained load through HAProxy is spread over both instances;
2. kill -9 of one instance under load: HAProxy's SMTP check marks it DOWN, the load
   continues through the other, and once the killed instance restarts on its spool
   (and HAProxy brings it back) every message that got a 250 from either is delivered;
3. the instances log and decide on the client's address, not HAProxy's: a client
   from 127.0.0.6 is refused (554 5.7.1) and logged as such, and the Received: lines
   name 127.0.0.5;
4. a PROXY header from a peer outside trusted_proxies gets 421 4.7.0.

Skips (with the reason) when haproxy is not installed; CI installs it (.ci/run).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import signal
import struct
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest
from support.haproxy import HAProxy, haproxy_binary
from support.mail import make_message, message_id_of
from support.proxy import ProxyProcess, config_mapping, to_toml
from support.raw import RawClient
from support.waiting import wait_until

from smtpbalancer.sink import Sink

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_factories=["asyncio"]),
    pytest.mark.skipif(
        haproxy_binary() is None,
        reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)",
    ),
]

CLIENT = "127.0.0.5"  # in allow_networks
OTHER_CLIENT = "127.0.0.6"  # not in allow_networks
BALANCER = "127.0.0.9"  # HAProxy's source address: trusted proxy, not allowed to relay
INSTANCE_HOSTS = ("127.0.0.11", "127.0.0.12")  # own addresses: a restart can rebind the port
CLIENTS = 6
PER_CONNECTION = 5  # messages per SMTP session, then QUIT and reconnect (as an ESP does)
_RECEIVED_FROM = re.compile(rb"^Received: from \S+ \(\[([\d.]+)\]\)\r\n\tby (\S+) ")


@dataclass
class Load:
    """The ESP: clients through HAProxy; `acked` maps Message-ID -> instance that said 250."""

    port: int
    acked: dict[str, str] = field(default_factory=dict)
    errors: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def by_instance(self, since: int = 0) -> Counter[str]:
        return Counter(list(self.acked.values())[since:])

    async def client(self) -> None:
        while not self.stop.is_set():
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1",
                port=self.port,
                start_tls=False,
                timeout=10,
                source_address=(CLIENT, 0),
            )
            try:
                greeting = await smtp.connect()
                instance = greeting.message.split()[0]  # "inst-1.test ESMTP ..."
                for _ in range(PER_CONNECTION):
                    if self.stop.is_set():
                        break
                    msg_id, body = make_message(size=1500)
                    await smtp.sendmail("esp@sender.test", ["r@rcpt.test"], body)
                    self.acked[msg_id] = instance  # only after the 250 to the final dot
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                self.errors += 1  # the instance died under us: reconnect, as an ESP retries
                await asyncio.sleep(0.05)
            finally:
                smtp.close()


@pytest.fixture
async def haproxies() -> AsyncIterator[list[HAProxy]]:
    started: list[HAProxy] = []
    yield started
    for proxy in started:
        await proxy.stop()


def instance_config(tmp_path: Path, n: int, sinks: list[Sink], port: int = 0) -> Path:
    raw = config_mapping(
        tmp_path / f"spool-{n}",
        [(s.name, s.address, 1) for s in sinks],
        server={
            "listen": f"{INSTANCE_HOSTS[n - 1]}:{port}",
            "hostname": f"inst-{n}.test",
            "proxy_protocol": True,
            "trusted_proxies": [f"{BALANCER}/32"],
            "allow_networks": [f"{CLIENT}/32"],
        },
        health_check={"interval": "1s"},
    )
    for up in raw["upstream"]:
        up["max_connections"] = 2  # ~10 msg/s per relay: a backlog builds under any load
    path = tmp_path / f"instance-{n}.toml"
    path.write_text(to_toml(raw))
    return path


def delivered(sinks: list[Sink]) -> list[tuple[str, str, str]]:
    """(Message-ID, client address in Received:, instance) for every relayed message."""
    out = []
    for sink in sinks:
        for m in sink.received:
            found = _RECEIVED_FROM.match(m.data)
            assert found, m.data[:200]
            out.append((message_id_of(m.data), found.group(1).decode(), found.group(2).decode()))
    return out


async def smtp_dialogue(port: int, source: str) -> list[str]:
    client = await RawClient.open(("127.0.0.1", port), source=source)
    replies = [
        await client.command(line)
        for line in (b"EHLO other.test", b"MAIL FROM:<esp@sender.test>", b"RCPT TO:<r@rcpt.test>")
    ]
    await client.command(b"QUIT")
    await client.close()
    return replies


@pytest.mark.timeout(150)
async def test_two_instances_behind_haproxy_share_load_survive_kill_9_and_see_the_client(
    tmp_path: Path, sinks, haproxies: list[HAProxy]
) -> None:
    relays = [await sinks("a", delay_s=0.2), await sinks("b", delay_s=0.2)]
    configs = [instance_config(tmp_path, n, relays) for n in (1, 2)]
    instances = [ProxyProcess(path) for path in configs]
    load: Load | None = None
    clients: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(i.start() for i in instances))
        addresses = ((INSTANCE_HOSTS[0], instances[0].port), (INSTANCE_HOSTS[1], instances[1].port))
        balancer = HAProxy(tmp_path, addresses, source=BALANCER)
        haproxies.append(balancer)
        await balancer.start()
        load = Load(balancer.port)
        clients = [asyncio.create_task(load.client()) for _ in range(CLIENTS)]

        # 1. Spread: both instances answer 250s through the one HAProxy address.
        await wait_until(lambda: len(load.acked) >= 300, timeout=30)
        spread = load.by_instance()
        assert min(spread["inst-1.test"], spread["inst-2.test"]) >= 0.25 * len(load.acked), spread
        sessions = {name: int(row["stot"]) for name, row in (await balancer.stats()).items()}
        assert min(sessions.values()) >= 5, sessions

        # 2. kill -9 instance 1 while it holds acked, undelivered mail.
        instances[0].signal(signal.SIGKILL)
        assert await instances[0].wait() == -signal.SIGKILL
        relayed = {mid for mid, _, _ in delivered(relays)}
        acked_by_1 = {mid for mid, inst in load.acked.items() if inst == "inst-1.test"}
        stranded = acked_by_1 - relayed
        assert stranded, "the kill must leave acked mail in instance 1's spool"

        async def status(server: str) -> str:
            return (await balancer.servers())[server]

        async def wait_status(server: str, prefix: str, timeout: float) -> None:
            async with asyncio.timeout(timeout):
                while not (await status(server)).startswith(prefix):
                    await asyncio.sleep(0.05)

        await wait_status("instance-1", "DOWN", timeout=20)
        at_down = len(load.acked)
        await wait_until(lambda: len(load.acked) >= at_down + 150, timeout=30)
        assert set(load.by_instance(since=at_down)) == {"inst-2.test"}
        assert (await status("instance-2")).startswith("UP")

        # Restart on the same spool and port; HAProxy's check brings it back into rotation.
        restart_config = instance_config(tmp_path, 1, relays, port=instances[0].port)
        instances[0] = ProxyProcess(restart_config)
        await instances[0].start()
        await wait_status("instance-1", "UP", timeout=30)
        at_up = len(load.acked)
        await wait_until(lambda: load.by_instance(since=at_up)["inst-1.test"] >= 20, timeout=30)
        load.stop.set()
        await asyncio.gather(*clients)

        # Every 250, from either instance and before or after the kill, is relayed. The slow
        # relays made the backlog; fast ones on the same addresses clear it in seconds.
        for slow in list(relays):
            fast = await sinks(f"{slow.name}-fast")
            await fast.stop()
            await slow.stop()
            await fast.start(*slow.address)
            relays.append(fast)
        acked = set(load.acked)

        def all_relayed() -> bool:  # parsing every message is costly: count first
            if sum(s.messages for s in relays) < len(acked):
                return False
            return acked <= {mid for mid, _, _ in delivered(relays)}

        await wait_until(all_relayed, timeout=60)
        assert "spool.recovered messages=" in instances[0].log()
        ids = [mid for mid, _, _ in delivered(relays)]
        assert max(Counter(ids).values()) <= 2  # at least once: a resend only across the kill

        # 3. The instances saw the client, never HAProxy: trace and policy use 127.0.0.5.
        assert {client for _, client, _ in delivered(relays)} == {CLIENT}
        refused = await smtp_dialogue(balancer.port, OTHER_CLIENT)
        assert refused[2].startswith("554 5.7.1 "), refused
        logs = instances[0].log() + instances[1].log()
        assert f"smtp.relay_denied client={OTHER_CLIENT} " in logs
        assert f"client={BALANCER}" not in logs

        # 4. A PROXY header straight from a client (not a trusted proxy) is refused.
        # The peer is checked when it connects, so the 421 comes before the header is read;
        # the header (claiming an allowed client) is sent anyway and changes nothing.
        direct = await RawClient.open(addresses[1], source=CLIENT, greet=False)
        assert (await direct.reply()).startswith("421 4.7.0 ")
        with contextlib.suppress(ConnectionError):
            await direct.send(proxy_v2_header(CLIENT, INSTANCE_HOSTS[1]) + b"EHLO x.test\r\n")
            assert await direct.until_eof() == b""
        await direct.close()
        await wait_until(lambda: f"smtp.untrusted_proxy peer={CLIENT}" in instances[1].log())

        print(
            f"acked={len(acked)} by_instance={dict(load.by_instance())} stranded_at_kill="
            f"{len(stranded)} delivered={len(ids)} duplicates={len(ids) - len(set(ids))} "
            f"client_errors={load.errors} haproxy_sessions={sessions}"
        )
        for proc in instances:
            proc.signal(signal.SIGTERM)
        assert [await proc.wait() for proc in instances] == [0, 0]
    finally:
        if load is not None:
            load.stop.set()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        for proc in instances:
            await proc.kill()


def proxy_v2_header(source: str, destination: str) -> bytes:
    """A valid PROXY v2 header (TCP over IPv4) naming `source` as the client."""
    payload = (
        ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address(destination).packed
        + struct.pack("!HH", 40000, 587)
    )
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(payload)) + payload
