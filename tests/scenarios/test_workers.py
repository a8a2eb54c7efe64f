"""`[server] workers = 2`: two relay processes share the SMTP port, one spool shard each.

A real `smtpbalancer serve` supervisor and its workers over loopback: mail spreads over
both, the admin listener shows both (metrics with a `worker` label, combined /status),
a worker killed with -9 is restarted on its shard and every acknowledged message is
delivered, SIGTERM stops everything with exit 0, and a lowered worker count that would
strand a shard refuses to start.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.mail import make_message, message_id_of, send_mail
from support.proxy import ProxyProcess, config_mapping, to_toml
from support.waiting import wait_until

pytestmark = [pytest.mark.asyncio(loop_factories=["uvloop"]), pytest.mark.timeout(120)]

_METRICS = re.compile(r"smtpbalancer\.ready smtp=\S+ workers=2 metrics=([\d.]+):(\d+)")
_WORKER = re.compile(r"workers\.started worker=(\d) pid=(\d+)")


def write_config(tmp_path: Path, sinks_: list[Any], workers: int = 2) -> Path:
    raw = config_mapping(
        tmp_path / "spool",
        [(s.name, s.address, 1) for s in sinks_],
        server={"workers": workers},
        metrics={"listen": "127.0.0.1:0"},
    )
    path = tmp_path / "relay.toml"
    path.write_text(to_toml(raw))
    return path


def admin_port(proxy: ProxyProcess) -> int:
    found = _METRICS.search(proxy.log())
    assert found, proxy.log()
    return int(found.group(2))


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """Latest pid per worker index, from the supervisor's log."""
    return {int(i): int(pid) for i, pid in _WORKER.findall(proxy.log())}


def http(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def running(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def samples(text: str, name: str) -> dict[str, float]:
    """worker label -> value of the unlabelled-but-for-worker sample `name`."""
    pattern = re.compile(rf'^{name}\{{worker="(\d+)"\}} (\S+)$', re.MULTILINE)
    return {w: float(v) for w, v in pattern.findall(text)}


async def send_many(port: int, count: int, acked: list[str], clients: int = 10) -> None:
    """`count` messages over `clients` senders, a new connection per message."""
    queue = list(range(count))

    async def client() -> None:
        while queue:
            queue.pop()
            msg_id, body = make_message()
            try:
                await send_mail(port, body)
            except Exception:  # a killed worker's connection: not acknowledged, not counted
                continue
            acked.append(msg_id)

    await asyncio.gather(*(client() for _ in range(clients)))


async def start_proxy(proxies: Any, path: Path) -> ProxyProcess:
    proxy: ProxyProcess = await proxies(path)
    await wait_until(lambda: _METRICS.search(proxy.log()) is not None, timeout=30)
    return proxy


async def test_two_workers_share_the_port_and_the_admin_listener_shows_both(
    tmp_path: Path, sinks, proxies
) -> None:
    a, b = await sinks("w-a"), await sinks("w-b")
    proxy = await start_proxy(proxies, write_config(tmp_path, [a, b]))
    port = admin_port(proxy)
    acked: list[str] = []
    await send_many(proxy.port, 300, acked)
    assert len(acked) == 300
    await wait_until(lambda: a.messages + b.messages == 300, timeout=30)
    delivered = sorted(message_id_of(m.data) for s in (a, b) for m in s.received)
    assert delivered == sorted(acked)

    code, text = await asyncio.to_thread(http, port, "/metrics")
    assert code == 200
    received = samples(text, "smtpbalancer_messages_received_total")
    assert set(received) == {"0", "1"} and sum(received.values()) == 300
    assert min(received.values()) >= 30, f"the kernel spread connections unevenly: {received}"
    assert samples(text, "smtpbalancer_worker_up") == {"0": 1.0, "1": 1.0}

    code, body = await asyncio.to_thread(http, port, "/status")
    status = json.loads(body)
    assert code == 200 and set(status["workers"]) == {"0", "1"} and status["ready"] is True
    await wait_until(lambda: json.loads(http(port, "/status")[1])["queue"]["messages"] == 0)
    assert (await asyncio.to_thread(http, port, "/readyz"))[0] == 200
    code, body = await asyncio.to_thread(http, port, "/queue/hold?id=NOSUCHID", "POST")
    assert code == 404 and json.loads(body)["results"] == {"NOSUCHID": "unknown"}

    proxy.signal(signal.SIGTERM)
    assert await proxy.wait() == 0
    for pid in worker_pids(proxy).values():
        assert not running(pid), "the supervisor waited for its workers"


async def test_a_worker_killed_mid_load_is_restarted_and_nothing_acknowledged_is_lost(
    tmp_path: Path, sinks, proxies
) -> None:
    a, b = await sinks("k-a", delay_s=0.01), await sinks("k-b", delay_s=0.01)
    proxy = await start_proxy(proxies, write_config(tmp_path, [a, b]))
    acked: list[str] = []
    load = asyncio.create_task(send_many(proxy.port, 600, acked))
    await wait_until(lambda: len(acked) >= 150, timeout=30)
    victim = worker_pids(proxy)[1]
    os.kill(victim, signal.SIGKILL)
    await load
    await wait_until(lambda: worker_pids(proxy)[1] != victim, timeout=30)  # restarted
    assert "workers.died worker=1" in proxy.log()
    await wait_until(
        lambda: {message_id_of(m.data) for s in (a, b) for m in s.received} >= set(acked),
        timeout=60,
    )
    assert len(acked) >= 500, "the other worker kept accepting"
    print(f"acked {len(acked)} of 600; log: {proxy.log().count('spool.recovered')} recoveries")


async def test_fewer_workers_than_spool_shards_refuses_to_start(tmp_path: Path, sinks) -> None:
    relay = await sinks("s-a")
    path = write_config(tmp_path, [relay], workers=2)
    shard = tmp_path / "spool" / "worker-1" / "queue"
    shard.mkdir(parents=True)
    (shard / "LEFTOVER").write_bytes(b"a message the second worker never delivered")
    path.write_text(path.read_text().replace("workers = 2", "workers = 1"))
    single = ProxyProcess(path)
    with pytest.raises(RuntimeError):
        await single.start()
    assert await single.wait() == 1
    assert "workers.stranded_shards" in single.log()
    assert (shard / "LEFTOVER").exists()
