"""Hot reload: SIGHUP or the admin hook re-reads the config file without a restart.

In-process App with its config file on disk, plus one real `smtpbalancer serve`
that gets a real SIGHUP. Invariant 6: reload never half-applies; unchanged
upstreams keep their breaker, pool and counters.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from prometheus_client import REGISTRY
from support.mail import make_message, message_id_of, send_mail
from support.proxy import config_mapping, to_toml
from support.waiting import wait_until

from smtpbalancer import config
from smtpbalancer.app import App


def write(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(to_toml(raw), encoding="utf-8")
    return path


def failures() -> float:
    return REGISTRY.get_sample_value("smtpbalancer_config_reload_failures_total") or 0.0


async def sender(
    port: int, started: list[str], acked: list[str], stop: asyncio.Event, serial: itertools.count
) -> None:
    """One client sending on a reused connection until `stop`; records each Message-ID."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=15)
    await smtp.connect()
    while not stop.is_set():
        msg_id, body = make_message(msg_id=f"<r{next(serial)}@reload.test>", size=300)
        started.append(msg_id)
        await smtp.sendmail("esp@sender.test", ["r@rcpt.test"], body)
        acked.append(msg_id)
    await smtp.quit()


def series_of(upstream: str) -> list[str]:
    return [
        sample.name
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.labels.get("upstream") == upstream
    ]


async def test_reload_under_load_reweights_adds_and_removes_without_loss(
    tmp_path: Path, sinks
) -> None:
    a, b, c, d = await sinks("hr-a"), await sinks("hr-b"), await sinks("hr-c"), await sinks("hr-d")
    spool = tmp_path / "spool"
    before = [("hr-a", a.address, 1), ("hr-b", b.address, 1), ("hr-c", c.address, 1)]
    after = [("hr-a", a.address, 1), ("hr-b", b.address, 5), ("hr-d", d.address, 2)]
    path = write(tmp_path / "relay.toml", config_mapping(spool, before))
    async with App(config.load(path), config_path=path) as app:
        kept = app.registry["hr-a"]
        breaker, pool = kept.breaker, kept.pool
        removed = app.registry["hr-c"]
        started: list[str] = []
        acked: list[str] = []
        stop, serial = asyncio.Event(), itertools.count()
        clients = [
            asyncio.create_task(sender(app.smtp_address[1], started, acked, stop, serial))
            for _ in range(6)
        ]
        await wait_until(lambda: c.messages >= 20 and len(acked) >= 100)

        write(path, config_mapping(spool, after))
        line = await app.reload()
        acked_at_reload, started_at_reload = len(acked), len(started)
        assert line.startswith("reload generation=2 changed=")
        assert set(line.split("changed=")[1].split(",")) == {
            "upstream.hr-c(removed)",
            "upstream.hr-b.weight",
            "upstream.hr-d(added)",
        }

        await wait_until(lambda: d.messages >= 20 and len(acked) >= acked_at_reload + 200)
        stop.set()
        await asyncio.gather(*clients)
        await wait_until(lambda: app.store.messages == 0 and app.dispatcher.inflight == 0)

        assert app.registry["hr-a"] is kept
        assert kept.breaker is breaker and kept.pool is pool, "unchanged upstream keeps its state"
        assert app.registry["hr-b"].weight == 5
        assert [u.name for u in app.registry] == ["hr-a", "hr-b", "hr-d"]
        assert removed.pool.size == 0, "the removed upstream's pool drained and closed"
        await wait_until(lambda: not series_of("hr-c"))  # dashboards stop showing it
        assert series_of("hr-a") and series_of("hr-d")
        assert app.health.healthy("hr-d"), "the added upstream is probed"
        with pytest.raises(KeyError):
            app.health.healthy("hr-c")  # the removed one is not
    delivered = [message_id_of(m.data) for s in (a, b, c, d) for m in s.received]
    assert sorted(delivered) == sorted(acked), "zero loss, zero duplicates"
    sent_after_reload = set(started[started_at_reload:])  # spooled after the swap
    assert not sent_after_reload & {message_id_of(m.data) for m in c.received}
    print(f"a={a.messages} b={b.messages} c={c.messages} d={d.messages} of {len(acked)}")


async def test_an_invalid_file_keeps_the_old_config(
    tmp_path: Path, sinks, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await sinks("inv-relay")
    raw = config_mapping(tmp_path / "spool", [("inv-relay", relay.address, 2)])
    path = write(tmp_path / "relay.toml", raw)
    async with App(config.load(path), config_path=path) as app:
        generation = REGISTRY.get_sample_value("smtpbalancer_config_generation")
        failed_before = failures()
        raw["upstream"][0]["weight"] = -1
        write(path, raw)
        with caplog.at_level(logging.INFO, logger="smtpbalancer.reload"):
            line = await app.reload()
        assert line.startswith("reload failed generation=1 kept=old")
        assert "upstream[0].weight: must be ≥ 0" in caplog.text
        assert failures() == failed_before + 1
        assert REGISTRY.get_sample_value("smtpbalancer_config_generation") == generation
        assert app.reloader.generation == 1
        assert app.registry["inv-relay"].weight == 2

        _, body = make_message()
        await send_mail(app.smtp_address[1], body)
        await wait_until(lambda: relay.messages == 1 and app.store.messages == 0)


async def test_changed_tls_settings_get_a_new_pool_and_restart_only_keys_are_reported(
    tmp_path: Path, sinks
) -> None:
    relay, other = await sinks("tls-relay"), await sinks("tls-other")
    spool = tmp_path / "spool"
    ups = [("tls-relay", relay.address, 1), ("tls-other", other.address, 1)]
    path = write(tmp_path / "relay.toml", config_mapping(spool, ups))
    async with App(config.load(path), config_path=path) as app:
        old_relay, old_other = app.registry["tls-relay"], app.registry["tls-other"]
        changed = [("tls-relay", relay.address, 1, {"tls": "none"}), ups[1]]
        write(path, config_mapping(spool, changed, server={"listen": "127.0.0.1:1"}))
        line = await app.reload()
        assert line == (
            "reload generation=2 changed=upstream.tls-relay.tls restart_required=server.listen"
        )
        assert app.registry["tls-relay"] is not old_relay, "TLS changed: a fresh pool"
        assert app.registry["tls-other"] is old_other
        assert app.config.server.port == 0, "the listen address keeps its old value"
        for _ in range(4):
            _, body = make_message()
            await send_mail(app.smtp_address[1], body)
        await wait_until(lambda: relay.messages + other.messages == 4)


async def test_sighup_applies_a_weight_change_to_a_running_serve(
    tmp_path: Path, sinks, proxies
) -> None:
    a, b = await sinks("hup-a"), await sinks("hup-b")
    spool = tmp_path / "spool"
    path = write(
        tmp_path / "relay.toml",
        config_mapping(spool, [("hup-a", a.address, 1), ("hup-b", b.address, 0)]),
    )
    proxy = await proxies(path)
    for _ in range(3):
        _, body = make_message()
        await send_mail(proxy.port, body)
    await wait_until(lambda: a.messages == 3)

    write(path, config_mapping(spool, [("hup-a", a.address, 0), ("hup-b", b.address, 1)]))
    proxy.signal(signal.SIGHUP)
    await wait_until(lambda: "reload generation=2" in proxy.log())
    assert "changed=upstream.hup-a.weight,upstream.hup-b.weight" in proxy.log()
    for _ in range(3):
        _, body = make_message()
        await send_mail(proxy.port, body)
    await wait_until(lambda: b.messages == 3)
    assert a.messages == 3
    assert proxy.proc is not None and proxy.proc.returncode is None, "still running"
    proxy.signal(signal.SIGTERM)
    assert await proxy.wait() == 0
