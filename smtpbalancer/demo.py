"""`smtpbalancer demo`: the whole relay, end to end, on this machine.

Three local sinks stand in for upstream relays: relay-a is healthy, relay-b is
rate-limited at the proxy and now and then answers "454 Throttling failure",
relay-c is flaky (10% of recipients get 451), dies a third of the way through
the run and comes back at two thirds. A proxy on a temporary spool takes a few
thousand messages from concurrent SMTP clients on reused connections. The live
view shows each relay's health, breaker, effective rate and deliveries, and
the events (breaker opening and closing, health flips, throttling) as they
happen; the report compares shares with weights. Exit 0 only if every message
that got a 250 was delivered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import shutil
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from smtpbalancer import config
from smtpbalancer.app import App
from smtpbalancer.clock import SystemClock
from smtpbalancer.sink import Sink

DELIVERY_DEADLINE_S = 120.0
THROTTLE_REPLY = "454 4.7.0 Throttling failure: Maximum sending rate exceeded."


@dataclass(frozen=True, slots=True)
class Relay:
    name: str
    weight: int
    role: str
    tempfail_rate: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


RELAYS = (
    Relay("relay-a", 5, "healthy"),
    Relay("relay-b", 3, "throttles (454) now and then", extra={"rate": "150/s"}),
    Relay("relay-c", 2, "flaky (10% 451); dies at 1/3, back at 2/3", tempfail_rate=0.10),
)


@dataclass
class _Load:
    total: int
    accepted: set[str] = field(default_factory=set)
    refused: int = 0
    errors: int = 0

    @property
    def done(self) -> int:
        return len(self.accepted) + self.refused + self.errors


class _Events(logging.Handler):
    """Collects the proxy's breaker, health and throttling lines for the live view."""

    KEYS = ("upstream.breaker", "upstream.health", "upstream.throttled")

    def __init__(self, clock: SystemClock) -> None:
        super().__init__(logging.INFO)
        self._clock = clock
        self.start = clock.monotonic()
        self.lines: list[str] = []
        self.recent: deque[str] = deque(maxlen=6)

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith(self.KEYS):
            line = f"t+{self._clock.monotonic() - self.start:5.1f}s  {text[:150]}"
            self.lines.append(line)
            self.recent.append(line)


def _fit(line: str, width: int) -> Text:
    """One screen line: event texts can be long (upstream error messages)."""
    return Text(line if len(line) < width else line[: width - 2] + "…")


def _message(n: int) -> tuple[str, bytes]:
    msg_id = f"<demo-{n}@smtpbalancer.demo>"
    body = (
        f"From: Newsletter <news@esp.example>\r\nTo: reader{n}@example.net\r\n"
        f"Subject: Demo message {n}\r\nMessage-ID: {msg_id}\r\n\r\n"
        + "Hello from the smtpbalancer demo.\r\n"
        * 20
    )
    return msg_id, body.encode()


async def _client(port: int, load: _Load, serials: itertools.count[int]) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
    await smtp.connect()
    try:
        while (n := next(serials)) < load.total:
            msg_id, body = _message(n)
            try:
                await smtp.sendmail("news@esp.example", [f"reader{n}@example.net"], body)
                load.accepted.add(msg_id)
            except aiosmtplib.SMTPResponseException:
                load.refused += 1
            except aiosmtplib.SMTPException:
                load.errors += 1
                smtp.close()
                await smtp.connect()
    finally:
        smtp.close()


def _throttler(seed: int) -> object:
    rng = random.Random(seed)
    return lambda sender: THROTTLE_REPLY if rng.random() < 0.01 else None


async def run_demo(*, messages: int, clients: int, spool: Path | None) -> int:
    console = Console()
    spool_dir = spool or Path(tempfile.mkdtemp(prefix="smtpbalancer-demo-"))
    sinks = [
        Sink(name=r.name, keep=True, tempfail_rate=r.tempfail_rate, seed=i)
        for i, r in enumerate(RELAYS)
    ]
    sinks[1].mail_rule = _throttler(7)  # type: ignore[assignment]
    try:
        for sink in sinks:
            await sink.start()
        cfg = config.from_mapping(
            {
                "server": {"listen": "127.0.0.1:0", "hostname": "demo.smtpbalancer.local"},
                "spool": {"directory": str(spool_dir), "min_free_disk": 0},
                "delivery": {"retry_initial": "1s", "retry_max": "5s"},
                "metrics": {"listen": ""},
                "health_check": {"interval": "500ms", "timeout": "1s", "fall": 2, "rise": 2},
                "circuit_breaker": {"failure_threshold": 3, "open_for": "1s", "max_open_for": "4s"},
                "upstream": [
                    {
                        "name": r.name,
                        "address": f"{s.address[0]}:{s.address[1]}",
                        "weight": r.weight,
                        "slow_start": "2s",
                        **r.extra,
                    }
                    for r, s in zip(RELAYS, sinks, strict=True)
                ],
            },
            source="demo",
        )
        return await _drive(console, cfg, sinks, messages, clients)
    finally:
        for sink in sinks:
            await sink.stop()
        if spool is None:
            shutil.rmtree(spool_dir, ignore_errors=True)


def _upstream_table(app: App, sinks: list[Sink]) -> Table:
    table = Table(title="Relays", expand=False)
    for col in ("relay", "weight", "role", "health", "breaker", "rate", "delivered"):
        table.add_column(col, justify="right" if col in ("weight", "delivered") else "left")
    for relay, sink in zip(RELAYS, sinks, strict=True):
        up = app.registry[relay.name]
        rate = up.effective_rate
        table.add_row(
            relay.name,
            str(relay.weight),
            relay.role,
            "[green]up[/]" if up.healthy else "[red]down[/]",
            str(up.breaker.state),
            "-" if rate is None else f"{rate:.0f}/s",
            str(sink.messages),
        )
    return table


async def _drive(
    console: Console, cfg: config.Config, sinks: list[Sink], messages: int, clients: int
) -> int:
    clock = SystemClock()
    events = _Events(clock)
    proxy_log = logging.getLogger("smtpbalancer.upstream")
    proxy_log.addHandler(events)
    proxy_log.setLevel(logging.INFO)
    proxy_log.propagate = False
    load = _Load(messages)
    try:
        async with App(cfg, clock) as app:
            console.print(
                f"[bold]smtpbalancer demo[/]: {messages} messages from {clients} clients through "
                f"{app.smtp_address[0]}:{app.smtp_address[1]} (spool {cfg.spool.directory})"
            )
            columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn())  # fmt: skip
            bars = Progress(*columns)
            sent = bars.add_task("accepted", total=messages)
            done = bars.add_task("delivered", total=messages)

            def view() -> Group:
                recent = [_fit(line, console.width) for line in events.recent]
                return Group(bars, _upstream_table(app, sinks), *recent)

            started = clock.monotonic()
            with Live(view(), console=console, refresh_per_second=8) as live:
                serials = itertools.count()
                senders = asyncio.gather(
                    *(_client(app.smtp_address[1], load, serials) for _ in range(clients))
                )
                dying = sinks[2]
                address = dying.address
                stage = 0
                while not senders.done():
                    if stage == 0 and load.done >= messages / 3:
                        await dying.stop()
                        stage = 1
                    elif stage == 1 and load.done >= 2 * messages / 3:
                        await dying.start(*address)
                        stage = 2
                    bars.update(sent, completed=load.done)
                    bars.update(done, completed=len(load.accepted) - app.store.messages)
                    live.update(view())
                    await asyncio.sleep(0.1)
                await senders
                if stage == 1:
                    await dying.start(*address)
                accepted_at = clock.monotonic()
                bars.update(sent, completed=load.done)
                bars.update(done, total=len(load.accepted))
                while app.store.messages and clock.monotonic() < accepted_at + DELIVERY_DEADLINE_S:
                    bars.update(done, completed=len(load.accepted) - app.store.messages)
                    live.update(view())
                    await asyncio.sleep(0.1)
                finished_at = clock.monotonic()
                bars.update(done, completed=len(load.accepted) - app.store.messages)
                live.update(view())
            deferrals = app.dispatcher.deferrals
    finally:
        proxy_log.removeHandler(events)
        proxy_log.propagate = True
    return _report(console, sinks, load, deferrals, events, started, accepted_at, finished_at)


def _report(
    console: Console,
    sinks: list[Sink],
    load: _Load,
    deferrals: int,
    events: _Events,
    started: float,
    accepted_at: float,
    finished_at: float,
) -> int:
    seen: dict[str, int] = {}
    for sink in sinks:
        for msg in sink.received:
            for line in msg.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
                if line.startswith(b"Message-ID: "):
                    key = line[12:].decode()
                    seen[key] = seen.get(key, 0) + 1
    delivered = load.accepted & seen.keys()
    missing = load.accepted - seen.keys()
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    total_weight = sum(r.weight for r in RELAYS)
    delivered_total = sum(s.messages for s in sinks) or 1
    table = Table(title="Per upstream")
    for col in ("upstream", "weight share", "delivered share", "delivered", "451 injected"):
        table.add_column(col, justify="right")
    for relay, sink in zip(RELAYS, sinks, strict=True):
        table.add_row(
            relay.name,
            f"{relay.weight / total_weight:.1%}",
            f"{sink.messages / delivered_total:.1%}",
            str(sink.messages),
            str(sink.tempfails),
        )
    console.print()
    console.print(table)
    console.print("[bold]Events[/] (breaker, health, throttling):")
    for event in events.lines or ["(none)"]:
        console.print(_fit("  " + event, console.width))
    accept_s = max(accepted_at - started, 1e-9)
    total_s = max(finished_at - started, 1e-9)
    console.print(
        f"accepted {len(load.accepted)} (refused {load.refused}, client errors {load.errors}) "
        f"in {accept_s:.1f}s = {len(load.accepted) / accept_s:.0f} msg/s; "
        f"delivered {len(delivered)} in {total_s:.1f}s = "
        f"{len(delivered) / total_s:.0f} msg/s end to end "
        "(clients, sinks and proxy share one process)"
    )
    console.print(f"deferred attempts retried: {deferrals}; duplicates at sinks: {duplicates}")
    if missing:
        console.print(f"[bold red]FAIL[/]: {len(missing)} accepted messages were not delivered")
        return 1
    console.print("[bold green]OK[/]: delivered = accepted, every message that got a 250 arrived")
    return 0
