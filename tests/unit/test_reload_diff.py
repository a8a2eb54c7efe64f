"""The pure part of hot reload: a config diff by key path, and restart-only settings kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from smtpbalancer.config import Config, from_mapping
from smtpbalancer.reload import Diff, diff, keep_restart_only


def cfg(*upstreams: dict[str, Any], **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:2525", "hostname": "proxy.test"},
        "spool": {"directory": "/tmp/spool"},
        "upstream": list(upstreams)
        or [
            {"name": "relay-a", "address": "10.0.0.1:25", "weight": 3},
            {"name": "relay-b", "address": "10.0.0.2:25", "weight": 1},
        ],
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_mapping(raw)


A = {"name": "relay-a", "address": "10.0.0.1:25", "weight": 3}
B = {"name": "relay-b", "address": "10.0.0.2:25", "weight": 1}
C = {"name": "relay-c", "address": "10.0.0.3:25"}


def test_the_same_file_is_no_change() -> None:
    assert diff(cfg(), cfg()) == Diff()


@pytest.mark.parametrize(
    ("new", "changed"),
    [
        (cfg(A, {**B, "weight": 5}), ("upstream.relay-b.weight",)),
        (cfg(A, B, C), ("upstream.relay-c(added)",)),
        (cfg(A), ("upstream.relay-b(removed)",)),
        (cfg(A, {**B, "address": "10.0.0.9:25"}), ("upstream.relay-b.address",)),
        (cfg(A, {**B, "tls": "starttls", "tls_verify": False}), ("upstream.relay-b.tls",
                                                                  "upstream.relay-b.tls_verify")),
        (cfg(A, B, delivery={"retry_max": "1h"}), ("delivery.retry_max_s",)),
        (cfg(A, B, server={"max_recipients": 10}), ("server.max_recipients",)),
        (cfg(A, B, circuit_breaker={"failure_threshold": 9}),
         ("circuit_breaker.failure_threshold",)),
    ],
)  # fmt: skip
def test_live_changes_are_named_by_key_path(new: Config, changed: tuple[str, ...]) -> None:
    assert diff(cfg(A, B), new) == Diff(changed=changed)


def test_removed_added_and_changed_together() -> None:
    change = diff(cfg(A, B), cfg({**A, "weight": 1}, C))
    assert change.changed == (
        "upstream.relay-b(removed)",
        "upstream.relay-a.weight",
        "upstream.relay-c(added)",
    )


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"server": {"listen": "127.0.0.1:2526"}}, "server.listen"),
        ({"spool": {"directory": "/tmp/other"}}, "spool.directory"),
        ({"metrics": {"listen": "127.0.0.1:9999"}}, "metrics.listen"),
        ({"metrics": {"listen": ""}}, "metrics.listen"),
    ],
)
def test_restart_only_settings_are_reported_and_keep_their_old_value(
    sections: dict[str, Any], key: str
) -> None:
    old, new = cfg(A, B), cfg(A, B, **sections)
    assert diff(old, new) == Diff(restart_required=(key,))
    kept = keep_restart_only(old, new)
    assert diff(old, kept) == Diff()


def test_a_restart_only_change_does_not_hide_live_ones() -> None:
    old = cfg(A, B)
    new = cfg(A, {**B, "weight": 7}, server={"listen": "0.0.0.0:25", "max_connections": 5})
    change = diff(old, new)
    assert change.changed == ("server.max_connections", "upstream.relay-b.weight")
    assert change.restart_required == ("server.listen",)
    kept = keep_restart_only(old, new)
    assert (kept.server.host, kept.server.port) == ("127.0.0.1", 2525)
    assert kept.server.max_connections == 5
    assert kept.upstreams[1].weight == 7


def test_a_changed_password_is_named_never_shown(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("old-secret")
    auth = {**B, "username": "u", "password_file": str(secret), "tls": "starttls"}
    old = cfg(A, auth)
    secret.write_text("new-secret")
    change = diff(old, cfg(A, auth))
    assert change.changed == ("upstream.relay-b.password",)
    assert "secret" not in repr(change)
