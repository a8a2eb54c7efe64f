"""The public command line: check-config, version, and the demo a new user runs first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def smtpbalancer(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smtpbalancer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


GOOD = """
[server]
listen = "127.0.0.1:2525"
hostname = "relay.example.com"
max_message_size = "50MB"

[spool]
directory = "/tmp/spool"

[[upstream]]
name = "relay-a"
address = "10.0.0.5:587"
weight = 3
max_connections = 8

[[upstream]]
name = "relay-b"
address = "10.0.0.6:587"
backup = true
"""


def test_check_config_accepts_a_good_file_with_a_summary(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    done = smtpbalancer("check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert "relay-a=10.0.0.5:587 w=3" in done.stdout
    assert "relay-b=10.0.0.6:587 w=1 backup" in done.stdout


def test_check_config_names_every_bad_key_and_exits_non_zero(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        GOOD.replace("weight = 3", "weight = -1\nwieght = 2").replace(
            'max_message_size = "50MB"', 'max_message_size = "fifty"'
        )
    )
    done = smtpbalancer("check-config", "--config", str(path))
    assert done.returncode == 2
    assert "upstream[0].weight: must be ≥ 0" in done.stderr
    assert "upstream[0].wieght: unknown key" in done.stderr
    assert "server.max_message_size:" in done.stderr


def test_serve_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nlisten = 'nowhere'\n")
    done = smtpbalancer("serve", "--config", str(path), timeout=20)
    assert done.returncode == 2
    assert "server.listen" in done.stderr


def test_version() -> None:
    done = smtpbalancer("version")
    assert done.returncode == 0 and done.stdout.startswith("smtpbalancer 0.")


def test_demo_delivers_every_accepted_message_and_exits_0() -> None:
    done = smtpbalancer("demo", "--messages", "400", "--clients", "8", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "delivered = accepted" in done.stdout
    assert "Events (breaker, health, throttling)" in done.stdout
    for relay in ("relay-a", "relay-b", "relay-c"):
        assert relay in done.stdout
