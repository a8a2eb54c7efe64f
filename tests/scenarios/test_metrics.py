"""What an SRE sees: /metrics names and values, /healthz, /readyz, /status, from a live proxy.

Also checks that the shipped alert rules and dashboard use only metric names the
proxy really exports, and (when promtool is installed, as in CI) that the
exposition passes `promtool check metrics`.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import aiosmtplib
import pytest
from support.mail import make_message, send_mail
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App

ROOT = Path(__file__).resolve().parents[2]

REQUIRED = {
    "smtpbalancer_build_info",
    "smtpbalancer_messages_received_total",
    "smtpbalancer_messages_rejected_total",
    "smtpbalancer_messages_delivered_total",
    "smtpbalancer_messages_deferred_total",
    "smtpbalancer_messages_bounced_total",
    "smtpbalancer_delivery_attempts_total",
    "smtpbalancer_delivery_duration_seconds_bucket",
    "smtpbalancer_queue_messages",
    "smtpbalancer_queue_bytes",
    "smtpbalancer_queue_oldest_message_age_seconds",
    "smtpbalancer_spool_free_bytes",
    "smtpbalancer_sessions_active",
    "smtpbalancer_upstream_healthy",
    "smtpbalancer_upstream_circuit_state",
    "smtpbalancer_upstream_connections",
    "smtpbalancer_upstream_effective_rate",
    "smtpbalancer_config_generation",
    "smtpbalancer_config_reload_failures_total",
}


def get(address: tuple[str, int], path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(address: tuple[str, int]) -> dict[str, float]:
    samples = {}
    for line in get(address, "/metrics")[1].splitlines():
        if line.startswith("smtpbalancer_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def names(samples: dict[str, float]) -> set[str]:
    return {key.split("{", 1)[0] for key in samples}


async def test_metrics_and_admin_endpoints_from_a_live_proxy(tmp_path: Path, sinks) -> None:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool",
        [("m-relay", relay.address, 1)],
        metrics={"listen": "127.0.0.1:0"},
        server={"allow_networks": ["127.0.0.1/32"]},
    )
    async with App(cfg) as app:
        assert app.metrics_address is not None
        before = await asyncio.to_thread(scrape, app.metrics_address)
        for _ in range(3):
            _, body = make_message()
            await send_mail(app.smtp_address[1], body)
        # one refusal: a client outside allow_networks
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=app.smtp_address[1], source_address=("127.0.0.2", 0)
        )
        await client.connect()
        await client.mail("a@b.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused):
            await client.rcpt("c@d.test")
        await client.quit()
        await wait_until(lambda: relay.messages == 3 and app.store.messages == 0)
        after = await asyncio.to_thread(scrape, app.metrics_address)
        exposition = (await asyncio.to_thread(get, app.metrics_address, "/metrics"))[1]

        assert (await asyncio.to_thread(get, app.metrics_address, "/healthz"))[0] == 200
        ready = await asyncio.to_thread(get, app.metrics_address, "/readyz")
        assert ready[0] == 200, ready
        status = json.loads((await asyncio.to_thread(get, app.metrics_address, "/status"))[1])
        assert status["queue"]["messages"] == 0
        assert [u["name"] for u in status["upstreams"]] == ["m-relay"]
        assert status["upstreams"][0]["healthy"] is True
        assert status["upstreams"][0]["breaker"] == "closed"

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    missing = REQUIRED - names(after)
    assert not missing, f"not exported: {sorted(missing)}"
    assert delta("smtpbalancer_messages_received_total") == 3
    assert delta('smtpbalancer_messages_delivered_total{upstream="m-relay"}') == 3
    assert delta('smtpbalancer_messages_rejected_total{reason="relay_denied"}') == 1
    assert after["smtpbalancer_queue_messages"] == 0
    assert after['smtpbalancer_upstream_circuit_state{state="closed",upstream="m-relay"}'] == 1
    assert after["smtpbalancer_spool_free_bytes"] > 0
    assert not any(name.endswith("_created") for name in after)
    # Labels stay bounded: never an address or a domain.
    assert "rcpt.test" not in exposition and "d.test" not in exposition

    shipped = referenced_metric_names()
    exported = names(after) | {n.rsplit("_bucket", 1)[0] for n in names(after)}
    assert shipped and shipped <= exported, f"unknown names: {sorted(shipped - exported)}"

    if shutil.which("promtool"):
        checked = await asyncio.to_thread(
            subprocess.run,
            ["promtool", "check", "metrics"],
            input=exposition,
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def referenced_metric_names() -> set[str]:
    """Every smtpbalancer_* name used by the shipped alerts and dashboard."""
    found: set[str] = set()
    for path in (ROOT / "deploy").rglob("*"):
        if path.suffix in (".yml", ".yaml", ".json") and "test" not in path.name:
            found |= set(re.findall(r"smtpbalancer_[a-z_]+", path.read_text()))
    return found


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (CI installs it)"
)
def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    rules = ROOT / "deploy" / "prometheus"
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(["promtool", *args], cwd=rules, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def post(address: tuple[str, int], path: str) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{address[0]}:{address[1]}{path}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_draining_a_relay_through_the_admin_listener_moves_its_traffic(
    tmp_path: Path, sinks
) -> None:
    kept, drained = await sinks("kept"), await sinks("drained")
    cfg = make_config(
        tmp_path / "spool",
        [("kept", kept.address, 1), ("drained", drained.address, 1, {"slow_start": "0s"})],
        metrics={"listen": "127.0.0.1:0"},
    )
    async with App(cfg) as app:
        assert app.metrics_address is not None
        code, _ = await asyncio.to_thread(post, app.metrics_address, "/upstreams/drained/drain")
        assert code == 200
        for _ in range(10):
            _, body = make_message()
            await send_mail(app.smtp_address[1], body)
        await wait_until(lambda: kept.messages == 10)
        assert drained.messages == 0
        status = json.loads((await asyncio.to_thread(get, app.metrics_address, "/status"))[1])
        assert [u["drained"] for u in status["upstreams"]] == [False, True]

        code, _ = await asyncio.to_thread(post, app.metrics_address, "/upstreams/drained/undrain")
        assert code == 200
        code, _ = await asyncio.to_thread(
            post, app.metrics_address, "/upstreams/kept/weight?value=0"
        )
        assert code == 200
        for _ in range(10):
            _, body = make_message()
            await send_mail(app.smtp_address[1], body)
        await wait_until(lambda: drained.messages == 10 and app.store.messages == 0)
    assert kept.messages == 10
