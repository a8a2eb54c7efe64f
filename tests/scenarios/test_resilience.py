"""When a relay is sick, throttling or dead, mail keeps flowing through the others.

Real sinks on 127.0.0.1, real timeouts kept short. The figures these tests
measure (attempts seen by a failing relay, rate accuracy) are printed with -s.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest
from prometheus_client import REGISTRY
from support.mail import make_message, message_id_of
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App
from smtpbalancer.upstream.breaker import BreakerState

FAST_HEALTH = {"interval": "100ms", "timeout": "500ms", "fall": 2, "rise": 2}


async def blast(port: int, count: int, clients: int = 4, size: int = 300) -> list[str]:
    """Send `count` messages over `clients` reused connections; the Message-IDs acked."""
    acked: list[str] = []
    serials = itertools.count()

    async def client() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=15)
        await smtp.connect()
        while next(serials) < count:
            msg_id, body = make_message(size=size)
            await smtp.sendmail("esp@sender.test", ["r@rcpt.test"], body)
            acked.append(msg_id)
        await smtp.quit()

    await asyncio.gather(*(client() for _ in range(clients)))
    return acked


def counting(reply: str | None) -> tuple[list[str], Callable[[str], str | None]]:
    seen: list[str] = []

    def rule(address: str) -> str | None:
        seen.append(address)
        return reply

    return seen, rule


async def test_a_relay_that_451s_everything_sees_threshold_plus_a_few_probes(
    tmp_path: Path, sinks
) -> None:
    seen, sick_rule = counting("451 4.3.0 Try again later")
    sick = await sinks("sick", mail_rule=sick_rule)
    a, b = await sinks("a"), await sinks("b")
    cfg = make_config(
        tmp_path / "spool",
        [("sick", sick.address, 1), ("a", a.address, 1), ("b", b.address, 1)],
        circuit_breaker={"failure_threshold": 3, "open_for": "1s"},
    )
    async with App(cfg) as app:
        acked = await blast(app.smtp_address[1], 200)
        await wait_until(lambda: a.messages + b.messages == 200 and app.store.messages == 0)
        assert app.registry["sick"].breaker.state is not BreakerState.CLOSED
    print(f"failing relay saw {len(seen)} attempts out of {len(acked)} messages")
    assert len(seen) <= 3 + 4, "threshold + a few probes (and what was in flight)"
    delivered = [message_id_of(m.data) for s in (a, b) for m in s.received]
    assert sorted(delivered) == sorted(acked)


def healthy_gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("smtpbalancer_upstream_healthy", {"upstream": name})


async def test_a_stopped_relay_goes_unhealthy_and_comes_back_to_traffic(
    tmp_path: Path, sinks
) -> None:
    flaky, steady = await sinks("hc-flaky"), await sinks("hc-steady")
    address = flaky.address
    cfg = make_config(
        tmp_path / "spool",
        [("hc-flaky", address, 1, {"slow_start": "0s"}), ("hc-steady", steady.address, 1)],
        health_check=FAST_HEALTH,
    )
    async with App(cfg) as app:
        await wait_until(lambda: healthy_gauge("hc-flaky") == 1.0)
        await flaky.stop()
        await wait_until(lambda: healthy_gauge("hc-flaky") == 0.0, timeout=2)
        await blast(app.smtp_address[1], 20, clients=2)
        await wait_until(lambda: steady.messages == 20)
        assert flaky.messages == 0

        await flaky.start(*address)
        await wait_until(lambda: healthy_gauge("hc-flaky") == 1.0, timeout=2)
        await blast(app.smtp_address[1], 20, clients=2)
        await wait_until(lambda: app.store.messages == 0)
    assert flaky.messages >= 8, "back in service, it gets its share again"


async def test_backup_tier_is_used_only_while_the_primary_is_down(tmp_path: Path, sinks) -> None:
    primary, spare = await sinks("bk-primary"), await sinks("bk-spare")
    address = primary.address
    cfg = make_config(
        tmp_path / "spool",
        [
            ("bk-primary", address, 1, {"slow_start": "0s"}),
            ("bk-spare", spare.address, 10, {"backup": True}),
        ],
        health_check=FAST_HEALTH,
    )
    async with App(cfg) as app:
        await blast(app.smtp_address[1], 20, clients=2)
        await wait_until(lambda: primary.messages == 20)
        assert spare.messages == 0, "untouched while the primary is healthy"

        await primary.stop()
        await blast(app.smtp_address[1], 20, clients=2)
        await wait_until(lambda: spare.messages == 20)

        await primary.start(*address)
        await wait_until(lambda: app.registry["bk-primary"].healthy, timeout=2)
        # The health check lets the breaker probe at once; the first message is the probe.
        await blast(app.smtp_address[1], 1, clients=1)
        await wait_until(lambda: app.registry["bk-primary"].breaker.state is BreakerState.CLOSED)
        await blast(app.smtp_address[1], 19, clients=2)
        await wait_until(lambda: primary.messages == 40 and app.store.messages == 0)
    assert spare.messages == 20, "traffic returned to the primary"


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_rate_50_per_second_holds_within_10_percent_over_10_seconds(
    tmp_path: Path, sinks
) -> None:
    relay = await sinks("rated")
    cfg = make_config(tmp_path / "spool", [("rated", relay.address, 1, {"rate": "50/s"})])
    async with App(cfg) as app:
        await blast(app.smtp_address[1], 600, clients=8)
        await wait_until(lambda: relay.messages == 600, timeout=20)
    times = sorted(m.received_mono for m in relay.received)
    # Skip the first second (the bucket starts with one second of tokens), then
    # measure 500 messages: ten seconds at 50/s.
    steady = times[100:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    print(f"measured {rate:.2f} msg/s against 50/s over {steady[-1] - steady[0]:.1f}s")
    assert 45.0 <= rate <= 55.0


async def test_a_throttling_reply_lowers_the_effective_rate_which_then_recovers(
    tmp_path: Path, sinks
) -> None:
    replies = iter(["454 4.7.0 Throttling failure: Maximum sending rate exceeded."])
    relay = await sinks("throttling", mail_rule=lambda sender: next(replies, None))
    cfg = make_config(
        tmp_path / "spool",
        [("throttling", relay.address, 1, {"rate": "200/s"})],
        circuit_breaker={"failure_threshold": 5},
    )
    async with App(cfg) as app:
        upstream = app.registry["throttling"]
        await blast(app.smtp_address[1], 1, clients=1)
        await wait_until(
            lambda: upstream.effective_rate is not None and upstream.effective_rate < 200
        )
        assert upstream.effective_rate == 100.0, "cut in half (AIMD)"
        assert (
            REGISTRY.get_sample_value(
                "smtpbalancer_upstream_effective_rate", {"upstream": "throttling"}
            )
            == 100.0
        )
        await blast(app.smtp_address[1], 60, clients=2)
        await wait_until(lambda: app.store.messages == 0 and relay.messages == 61)
        assert upstream.effective_rate == 200.0, "successes raised it back additively"


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_one_flapping_relay_in_three_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, sinks
) -> None:
    flapper, a, b = await sinks("flapper"), await sinks("fa"), await sinks("fb")
    cfg = make_config(
        tmp_path / "spool",
        [("flapper", flapper.address, 1), ("fa", a.address, 1), ("fb", b.address, 1)],
        circuit_breaker={"failure_threshold": 3, "open_for": "300ms", "max_open_for": "1s"},
        health_check=FAST_HEALTH,
    )
    moods = itertools.cycle([None, "451 4.3.0 Busy", None, "421 4.3.2 Going away"])

    async def flap() -> None:
        while True:
            mood = next(moods)
            flapper.mail_rule = None if mood is None else (lambda sender, m=mood: m)
            await asyncio.sleep(0.25)

    async with App(cfg) as app:
        flapping = asyncio.create_task(flap())
        acked = await blast(app.smtp_address[1], 5000, clients=10, size=200)
        flapping.cancel()
        flapper.mail_rule = None
        await wait_until(lambda: app.store.messages == 0, timeout=60)
    delivered = [message_id_of(m.data) for s in (flapper, a, b) for m in s.received]
    print(f"flapper {flapper.messages}, fa {a.messages}, fb {b.messages} of {len(acked)}")
    assert len(acked) == 5000
    assert sorted(delivered) == sorted(acked), "zero loss, zero duplicates"


async def test_an_exhausted_daily_quota_skips_the_relay_without_marking_it_sick(
    tmp_path: Path, sinks
) -> None:
    capped, other = await sinks("capped"), await sinks("uncapped")
    cfg = make_config(
        tmp_path / "spool",
        [("capped", capped.address, 5, {"daily_quota": 5}), ("uncapped", other.address, 1)],
    )
    async with App(cfg) as app:
        await blast(app.smtp_address[1], 30, clients=2)
        await wait_until(lambda: app.store.messages == 0 and capped.messages + other.messages == 30)
        upstream = app.registry["capped"]
        assert upstream.healthy and upstream.breaker.state is BreakerState.CLOSED
    assert capped.messages == 5
    assert other.messages == 25


async def test_large_envelopes_are_split_and_every_recipient_delivered_once(
    tmp_path: Path, sinks
) -> None:
    relay = await sinks("split")
    cfg = make_config(
        tmp_path / "spool", [("split", relay.address, 1, {"max_recipients_per_message": 50})]
    )
    rcpts = [f"r{n}@rcpt.test" for n in range(120)]
    async with App(cfg) as app:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.smtp_address[1], start_tls=False)
        await client.connect()
        _, body = make_message()
        errors, _ = await client.sendmail("esp@sender.test", rcpts, body)
        await client.quit()
        assert errors == {}
        await wait_until(lambda: app.store.messages == 0)
    assert [len(m.rcpt_tos) for m in relay.received] == [50, 50, 20]
    assert sorted(r for m in relay.received for r in m.rcpt_tos) == sorted(rcpts)


async def test_no_spinning_while_every_relay_is_down(tmp_path: Path, sinks) -> None:
    """Queued mail waits in the spool without burning CPU, and moves once a relay is back."""
    import socket
    import time

    def dead() -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return ("127.0.0.1", s.getsockname()[1])

    first, second = dead(), dead()
    cfg = make_config(
        tmp_path / "spool",
        [("down-1", first, 1), ("down-2", second, 1)],
        health_check=FAST_HEALTH,
        circuit_breaker={"failure_threshold": 2, "open_for": "200ms", "max_open_for": "400ms"},
    )
    async with App(cfg) as app:
        await blast(app.smtp_address[1], 200, clients=4)
        await wait_until(lambda: not app.registry["down-1"].healthy)
        await wait_until(lambda: not app.registry["down-2"].healthy)
        await asyncio.sleep(0.5)  # breakers' open periods run out while still unhealthy
        cpu_before, wall_before = time.process_time(), time.monotonic()
        await asyncio.sleep(2.0)
        cpu = time.process_time() - cpu_before
        wall = time.monotonic() - wall_before
        print(f"CPU {cpu:.2f}s over {wall:.1f}s with 200 queued and every relay down")
        assert cpu < 0.25 * wall, "waiting mail must not burn CPU"
        assert app.store.messages == 200

        relay = await sinks("back")
        await relay.stop()
        await relay.start(*first)
        await wait_until(lambda: app.store.messages == 0, timeout=10)
    assert relay.messages == 200
