"""/metrics shows what an SRE needs first: received, delivered per upstream, queue size."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from support.mail import make_message, send_mail
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App


def scrape(address: tuple[str, int]) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("smtpbalancer_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_metrics_count_received_delivered_and_queue(tmp_path: Path, sinks) -> None:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool", [("m-relay", relay.address, 1)], metrics={"listen": "127.0.0.1:0"}
    )
    async with App(cfg) as app:
        assert app.metrics_address is not None
        before = scrape(app.metrics_address)
        for _ in range(3):
            _, body = make_message()
            await send_mail(app.smtp_address[1], body)
        await wait_until(lambda: relay.messages == 3 and app.store.messages == 0)
        after = scrape(app.metrics_address)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("smtpbalancer_messages_received_total") == 3
    assert delta('smtpbalancer_messages_delivered_total{upstream="m-relay"}') == 3
    assert after["smtpbalancer_queue_messages"] == 0
    assert after['smtpbalancer_upstream_circuit_state{state="closed",upstream="m-relay"}'] == 1
    assert not any(name.endswith("_created") for name in after)
