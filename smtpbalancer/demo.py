"""`smtpbalancer demo`: the whole relay, end to end, on this machine.

Starts three local sinks (relay-c is flaky: 10% of recipients get 451), a
proxy on a temporary spool, sends a few thousand messages from several
concurrent SMTP clients on reused connections, waits until every accepted
message reached a sink, and prints a report. Exit 0 only if every message
that got a 250 was delivered.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from smtpbalancer import config
from smtpbalancer.app import App
from smtpbalancer.clock import SystemClock
from smtpbalancer.sink import Sink

RELAYS = (("relay-a", 5, 0.0), ("relay-b", 3, 0.0), ("relay-c", 2, 0.10))
DELIVERY_DEADLINE_S = 120.0


@dataclass
class _Load:
    total: int
    accepted: set[str] = field(default_factory=set)
    refused: int = 0
    errors: int = 0


def _message(n: int) -> tuple[str, bytes]:
    msg_id = f"<demo-{n}@smtpbalancer.demo>"
    body = (
        f"From: Newsletter <news@esp.example>\r\nTo: reader{n}@example.net\r\n"
        f"Subject: Demo message {n}\r\nMessage-ID: {msg_id}\r\n\r\n"
        + "Hello from the smtpbalancer demo.\r\n"
        * 20
    )
    return msg_id, body.encode()


async def _client(port: int, load: _Load, serials: itertools.count[int], tick: object) -> None:
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
            tick()  # type: ignore[operator]
    finally:
        smtp.close()


async def run_demo(*, messages: int, clients: int, spool: Path | None) -> int:
    console = Console(stderr=False)
    spool_dir = spool or Path(tempfile.mkdtemp(prefix="smtpbalancer-demo-"))
    sinks = [
        Sink(name=name, keep=True, tempfail_rate=rate, seed=i)
        for i, (name, _, rate) in enumerate(RELAYS)
    ]
    try:
        for sink in sinks:
            await sink.start()
        cfg = config.from_mapping(
            {
                "server": {"listen": "127.0.0.1:0", "hostname": "demo.smtpbalancer.local"},
                "spool": {"directory": str(spool_dir), "min_free_disk": 0},
                "delivery": {"retry_initial": "1s", "retry_max": "5s"},
                "metrics": {"listen": ""},
                "upstream": [
                    {"name": name, "address": f"{s.address[0]}:{s.address[1]}", "weight": w}
                    for (name, w, _), s in zip(RELAYS, sinks, strict=True)
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


async def _drive(
    console: Console, cfg: config.Config, sinks: list[Sink], messages: int, clients: int
) -> int:
    clock = SystemClock()
    relays = ", ".join(f"{n} (weight {w}{', flaky' if r else ''})" for n, w, r in RELAYS)
    console.print(
        f"[bold]smtpbalancer demo[/]: {messages} messages, {clients} clients, relays {relays}"
    )
    load = _Load(messages)
    async with App(cfg, clock) as app:
        console.print(
            f"proxy on {app.smtp_address[0]}:{app.smtp_address[1]}, spool {cfg.spool.directory}"
        )
        columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())  # fmt: skip
        with Progress(*columns, console=console) as bar:
            sent = bar.add_task("accepted", total=messages)
            done = bar.add_task("delivered", total=messages)
            started = clock.monotonic()
            serials = itertools.count()

            def tick() -> None:
                bar.update(sent, completed=len(load.accepted) + load.refused + load.errors)

            await asyncio.gather(
                *(_client(app.smtp_address[1], load, serials, tick) for _ in range(clients))
            )
            accepted_at = clock.monotonic()
            bar.update(done, total=len(load.accepted))
            deadline = accepted_at + DELIVERY_DEADLINE_S
            while clock.monotonic() < deadline:
                bar.update(done, completed=len(load.accepted) - app.store.messages)
                if app.store.messages == 0:
                    break
                await asyncio.sleep(0.1)
            finished_at = clock.monotonic()
            bar.update(done, completed=len(load.accepted) - app.store.messages)
        deferrals = app.dispatcher.deferrals
    return _report(console, sinks, load, deferrals, started, accepted_at, finished_at)


def _report(
    console: Console,
    sinks: list[Sink],
    load: _Load,
    deferrals: int,
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
    duplicates = sum(n - 1 for k, n in seen.items() if n > 1)
    total_weight = sum(w for _, w, _ in RELAYS)
    attempts = sum(s.messages + s.tempfails for s in sinks) or 1
    table = Table(title="Per upstream")
    for col in ("upstream", "weight share", "attempt share", "delivered", "451 injected"):
        table.add_column(col, justify="right")
    for (name, weight, _), sink in zip(RELAYS, sinks, strict=True):
        table.add_row(
            name,
            f"{weight / total_weight:.1%}",
            f"{(sink.messages + sink.tempfails) / attempts:.1%}",
            str(sink.messages),
            str(sink.tempfails),
        )
    console.print(table)
    accept_s = max(accepted_at - started, 1e-9)
    total_s = max(finished_at - started, 1e-9)
    console.print(
        f"accepted {len(load.accepted)} (refused {load.refused}, client errors {load.errors}) "
        f"in {accept_s:.1f}s = {len(load.accepted) / accept_s:.0f} msg/s; "
        f"delivered {len(delivered)} in {total_s:.1f}s = "
        f"{len(delivered) / total_s:.0f} msg/s end to end"
    )
    console.print(f"retries after a 451: {deferrals}; duplicates at sinks: {duplicates}")
    if missing:
        console.print(f"[bold red]FAIL[/]: {len(missing)} accepted messages were not delivered")
        return 1
    console.print("[bold green]OK[/]: delivered = accepted, every message that got a 250 arrived")
    return 0
