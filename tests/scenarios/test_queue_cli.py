"""`smtpbalancer queue …` and `trace` on a real spool left by a real proxy run.

The spool is filled by `smtpbalancer serve` while its only upstream is down,
then the proxy is stopped (SIGTERM) and the offline commands run as real
subprocesses. Held messages stay spooled across a restart; released ones go.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from support.mail import make_message, send_mail
from support.proxy import config_mapping, to_toml
from support.waiting import wait_until

pytestmark = pytest.mark.slow


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def cli(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtpbalancer", *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def cli_json(*args: str) -> Any:
    code, out, err = await cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def _write_config(tmp_path: Path, upstream: tuple[str, int]) -> Path:
    path = tmp_path / "proxy.toml"
    raw = config_mapping(tmp_path / "spool", [("relay", upstream, 1)])
    path.write_text(to_toml(raw))
    return path


async def _fill_spool(tmp_path: Path, proxies: Any, *, check_lock: bool = False) -> list[str]:
    """Three messages spooled with the upstream down; returns their queue ids."""
    cfg = _write_config(tmp_path, ("127.0.0.1", _closed_port()))
    proxy = await proxies(cfg)
    ids = []
    for sender, rcpts in (
        ("a@one.test", ["x@rcpt.test"]),
        ("b@one.test", ["y@rcpt.test", "z@rcpt.test"]),
        ("c@two.test", ["w@rcpt.test"]),
    ):
        _, body = make_message(sender=sender)
        _, reply = await send_mail(proxy.port, body, sender=sender, rcpts=rcpts)
        ids.append(reply.split()[-1])
    if check_lock:
        # Reading works on a running instance's spool; changing it needs the instance stopped.
        live = await cli_json("queue", "summary", "--config", str(cfg))
        assert live["messages"] == 3
        code, _, err = await cli("queue", "hold", ids[0], "--config", str(cfg))
        assert code == 1  # changes go through the admin listener, which this config turns off
        assert "an instance runs on the spool, but [metrics] is disabled" in err
    proxy.signal(signal.SIGTERM)
    assert await proxy.wait() == 0
    assert any(json.loads(line)["event"] == "smtpbalancer.ready" for line in proxy.stderr_lines)
    return ids


async def test_list_show_summary_live_and_offline_and_changes_refused_while_running(
    tmp_path: Path, proxies: Any
) -> None:
    ids = await _fill_spool(tmp_path, proxies, check_lock=True)
    cfg = str(tmp_path / "proxy.toml")

    rows = await cli_json("queue", "list", "--config", cfg)
    assert [r["queue_id"] for r in rows] == sorted(ids)
    by_id = {r["queue_id"]: r for r in rows}
    assert by_id[ids[1]]["sender"] == "b@one.test"
    assert (by_id[ids[1]]["pending"], by_id[ids[1]]["delivered"]) == (2, 0)
    assert all(r["state"] == "queued" and r["size"] > 200 for r in rows)

    code, table, _ = await cli("queue", "list", "--config", cfg)
    assert code == 0 and all(i in table for i in ids) and "3 message(s)" in table

    shown = await cli_json("queue", "show", ids[1], "--config", cfg)
    assert [r["rcpt"] for r in shown["recipients"]] == ["y@rcpt.test", "z@rcpt.test"]
    assert {r["state"] for r in shown["recipients"]} == {"pending"}
    assert shown["arrival"].endswith("Z") and shown["held"] is False

    summary = await cli_json("queue", "summary", "--config", cfg)
    assert summary["messages"] == 3
    assert summary["by_sender_domain"] == {"one.test": 2, "two.test": 1}
    assert summary["by_state"] == {"queued": 3}
    assert summary["by_age"] == {"<5m": 3}

    code, _, err = await cli("queue", "show", "0" * 20, "--config", cfg)
    assert code == 1 and "no message" in err


async def test_hold_delete_release_across_restarts(
    tmp_path: Path, proxies: Any, sinks: Any
) -> None:
    held, sent, deleted = await _fill_spool(tmp_path, proxies)
    cfg = str(tmp_path / "proxy.toml")

    assert (await cli("queue", "hold", held, "--config", cfg))[0] == 0
    assert (tmp_path / "spool" / "queue" / f"{held}.hold").exists()
    code, _, err = await cli("queue", "delete", deleted, "--config", cfg)  # stdin: not a tty
    assert code == 2 and "--yes" in err
    assert (await cli("queue", "delete", deleted, "--yes", "--config", cfg))[0] == 0
    states = {r["queue_id"]: r["state"] for r in await cli_json("queue", "list", "--config", cfg)}
    assert states == {held: "held", sent: "queued"}

    sink = await sinks("relay")
    _write_config(tmp_path, sink.address)  # same spool, the upstream is back
    proxy = await proxies(Path(cfg))
    await wait_until(lambda: len(sink.received) == 1, timeout=8)
    proxy.signal(signal.SIGTERM)
    assert await proxy.wait() == 0
    assert len(sink.received) == 1  # the held one stayed put
    log_file = tmp_path / "proxy.log"
    log_file.write_text("\n".join(proxy.stderr_lines) + "\n")

    traced = await cli_json("trace", sent, "--config", cfg, "--log", str(log_file))
    assert traced["spool"] is None  # delivered: gone from the spool
    [delivered] = [e for e in traced["log"] if e["event"] == "delivery.delivered"]
    assert delivered["upstream"] == "relay" and delivered["rcpts"] == 2
    assert delivered["upstream_queue_id"].startswith("relay-")
    held_trace = await cli_json("trace", held, "--config", cfg, "--log", str(log_file))
    assert held_trace["spool"]["state"] == "held"
    assert [e["event"] for e in held_trace["log"]] == ["spool.held"]

    assert (await cli("queue", "release", held, "--config", cfg))[0] == 0
    proxy = await proxies(Path(cfg))
    await wait_until(lambda: len(sink.received) == 2, timeout=8)
    proxy.signal(signal.SIGTERM)
    assert await proxy.wait() == 0
    assert await cli_json("queue", "list", "--config", cfg) == []
    # First the one never held, then (after release) the held one; the deleted one never.
    assert [m.mail_from for m in sink.received] == ["b@one.test", "a@one.test"]


async def test_hold_release_delete_and_retry_act_on_a_running_instance(
    tmp_path: Path, proxies: Any, sinks: Any
) -> None:
    accepting = False

    def rcpt_rule(address: str) -> str | None:
        return None if accepting else "451 4.3.0 Try again later"

    sink = await sinks("relay", rcpt_rule=rcpt_rule)
    path = tmp_path / "proxy.toml"
    raw = config_mapping(
        tmp_path / "spool",
        [("relay", sink.address, 1)],
        delivery={"retry_initial": "1h", "retry_max": "1h"},  # only `retry` brings them back
        metrics={"listen": f"127.0.0.1:{_closed_port()}"},
    )
    path.write_text(to_toml(raw))
    cfg = str(path)
    proxy = await proxies(path)
    ids = []
    for sender in ("held@one.test", "deleted@one.test", "retried@one.test"):
        _, body = make_message(sender=sender)
        _, reply = await send_mail(proxy.port, body, sender=sender)
        ids.append(reply.split()[-1])
    held, deleted, retried = ids
    await wait_until(lambda: proxy.log().count("delivery.retry_scheduled") >= 3, timeout=10)

    assert await cli_json("queue", "hold", held, "--config", cfg) == {
        "queue_id": held,
        "action": "held",
    }
    assert (tmp_path / "spool" / "queue" / f"{held}.hold").exists()  # survives a restart
    assert (await cli("queue", "delete", deleted, "--yes", "--config", cfg))[0] == 0
    code, _, err = await cli("queue", "delete", "0" * 20, "--yes", "--config", cfg)
    assert code == 1 and "no message" in err

    accepting = True  # the relay is back, but every message waits out its hour of backoff
    rows = await cli_json("queue", "retry", "--all", "--config", cfg)
    assert {r["queue_id"]: r["action"] for r in rows} == {held: "held", retried: "scheduled"}
    await wait_until(lambda: [m.mail_from for m in sink.received] == ["retried@one.test"])

    assert (await cli("queue", "release", held, "--config", cfg))[0] == 0
    await wait_until(lambda: len(sink.received) == 2, timeout=10)
    assert [m.mail_from for m in sink.received] == ["retried@one.test", "held@one.test"]
    assert not (tmp_path / "spool" / "queue" / f"{held}.hold").exists()
    summary = await cli_json("queue", "summary", "--config", cfg)
    assert summary["messages"] == 0  # the deleted one is gone, never delivered
    assert "queue.delete queue_id=" + deleted in proxy.log()
