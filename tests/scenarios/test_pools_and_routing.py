"""Named pools and [[route]] rules, spill, and duplicate suppression, over real SMTP.

One endpoint, two relay pools: transactional mail (by header, by sender) goes to its
own relay, marketing mail to two others; the routing header is stripped unless
`keep_header`; a pool with nothing eligible spills or holds; a resend of an accepted
message inside the dedupe window is acknowledged once more but delivered once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from support.mail import make_message, message_id_of, send_mail
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App

ROUTES = [
    {"pool": "transactional", "header": {"name": "X-Pool", "value": "transactional"}},
    {"pool": "transactional", "sender": "*@alerts.brand.example"},
    {"pool": "audit", "header": {"name": "X-Pool", "value": "audit"}, "keep_header": True},
    {"pool": "marketing"},
]


def pooled(sinks_by_pool: dict[str, list[Any]], **extra: dict[str, Any]) -> list[Any]:
    return [
        (s.name, s.address, 1, {"pool": pool, "slow_start": "0s", **extra.get(pool, {})})
        for pool, sinks in sinks_by_pool.items()
        for s in sinks
    ]


def routed(pool: str) -> float:
    return REGISTRY.get_sample_value("smtpbalancer_messages_routed_total", {"pool": pool}) or 0.0


def ids(*sinks: Any) -> list[str]:
    return sorted(message_id_of(m.data) for s in sinks for m in s.received)


async def send(port: int, *, header: str = "", sender: str = "esp@sender.test") -> str:
    msg_id, body = make_message(sender=sender)
    if header:
        body = header.encode() + b"\r\n" + body
    await send_mail(port, body, sender=sender)
    return msg_id


async def test_routes_pick_the_pool_by_header_and_sender_first_match_wins(
    tmp_path: Path, sinks
) -> None:
    tx, audit = await sinks("tx"), await sinks("audit")
    m1, m2 = await sinks("m1"), await sinks("m2")
    cfg = make_config(
        tmp_path / "spool",
        pooled({"transactional": [tx], "audit": [audit], "marketing": [m1, m2]}),
        route=ROUTES,
    )
    routed_before = routed("transactional")
    async with App(cfg) as app:
        port = app.smtp_address[1]
        by_header = [await send(port, header="X-Pool: Transactional") for _ in range(5)]
        by_sender = [await send(port, sender="ops@alerts.brand.example") for _ in range(5)]
        kept = [await send(port, header="x-pool: audit") for _ in range(3)]
        campaign = [await send(port) for _ in range(20)]
        await wait_until(lambda: app.store.messages == 0 and tx.messages == 10)
    assert ids(tx) == sorted(by_header + by_sender)
    assert ids(audit) == sorted(kept)
    assert ids(m1, m2) == sorted(campaign)
    assert m1.messages >= 5 and m2.messages >= 5, "the marketing pool keeps its weights"
    assert all(b"X-Pool" not in m.data for m in tx.received), "routing header stripped"
    assert all(b"x-pool: audit" in m.data for m in audit.received), "keep_header keeps it"
    assert routed("transactional") - routed_before == 10
    info = {"upstream": "tx", "pool": "transactional"}
    assert REGISTRY.get_sample_value("smtpbalancer_upstream_info", info) == 1


async def test_a_pool_with_nothing_eligible_spills_when_told_and_holds_otherwise(
    tmp_path: Path, sinks
) -> None:
    tx, marketing = await sinks("sp-tx"), await sinks("sp-m")
    await marketing.stop()
    cfg = make_config(
        tmp_path / "spool",
        pooled({"transactional": [tx], "marketing": [marketing]}),
        route=[{"pool": "marketing"}],
        pool={"marketing": {"spill": "transactional"}},
        health_check={"interval": "100ms", "fall": 1, "rise": 1},
    )
    async with App(cfg) as app:
        await wait_until(lambda: not app.registry["sp-m"].healthy)
        spilled = [await send(app.smtp_address[1]) for _ in range(5)]
        await wait_until(lambda: tx.messages == 5 and app.store.messages == 0)
    assert ids(tx) == sorted(spilled)

    held_tx, held_m = await sinks("h-tx"), await sinks("h-m")
    await held_m.stop()
    cfg = make_config(
        tmp_path / "spool2",
        pooled({"transactional": [held_tx], "marketing": [held_m]}),
        route=[{"pool": "marketing"}],
        health_check={"interval": "100ms", "fall": 1, "rise": 1},
    )
    async with App(cfg) as app:
        await wait_until(lambda: not app.registry["h-m"].healthy)
        held = [await send(app.smtp_address[1]) for _ in range(5)]
        await asyncio.sleep(1.0)  # give a wrong spill the time to happen
        assert held_tx.messages == 0 and app.store.messages == 5, "no spill: held in the spool"
        await held_m.start(*held_m.address)
        await wait_until(lambda: held_m.messages == 5 and app.store.messages == 0, timeout=15)
    assert ids(held_m) == sorted(held)


async def test_a_resend_inside_the_dedupe_window_is_acknowledged_but_not_queued(
    tmp_path: Path, sinks
) -> None:
    relay = await sinks("dd")
    cfg = make_config(tmp_path / "spool", [("dd", relay.address, 1)], dedupe={"window": "10m"})
    async with App(cfg) as app:
        port = app.smtp_address[1]
        _, body = make_message(msg_id="<campaign-42.7@esp.test>")
        await send_mail(port, body, rcpts=["a@rcpt.test", "b@rcpt.test"])
        _, reply = await send_mail(port, body, rcpts=["a@rcpt.test", "b@rcpt.test"])
        assert reply.startswith("2.0.0 Ok: duplicate, not queued again; queued as ")
        _, reply = await send_mail(port, body, rcpts=["b@rcpt.test", "c@rcpt.test"])
        assert "queued as" in reply and "duplicate" not in reply  # c is new: queued for c only
        changed = body.replace(b"lazy dog", b"lazy cat")  # same Message-ID, another body
        await send_mail(port, changed, rcpts=["a@rcpt.test"])
        await wait_until(lambda: app.store.messages == 0 and relay.messages == 3)
    rcpts = sorted(tuple(m.rcpt_tos) for m in relay.received)
    assert rcpts == [("a@rcpt.test",), ("a@rcpt.test", "b@rcpt.test"), ("c@rcpt.test",)]
    assert (REGISTRY.get_sample_value("smtpbalancer_duplicates_suppressed_total") or 0) >= 3
    assert app.handler.dedupe is not None and app.handler.dedupe.suppressed == 3


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        ({"pool": "nowhere"}, "route[0].pool: no [[upstream]] has pool = 'nowhere'"),
        ({"pool": "default", "header": {"name": "X-Pool"}}, "route[0].header: expected"),
        ({"pool": "default", "keep_header": True}, "route[0].keep_header: only means"),
    ],
)
def test_bad_routes_are_named_by_key_path(
    tmp_path: Path, route: dict[str, Any], problem: str
) -> None:
    from smtpbalancer.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, [("r", ("127.0.0.1", 25), 1)], route=[route])
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems
