"""Specification of the config reader: value parsers, key-path problems, defaults, TOML files."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path

import pytest

from smtpbalancer.config import (
    BreakerConfig,
    DeliveryConfig,
    HealthCheckConfig,
    MetricsConfig,
    ServerConfig,
    SpoolConfig,
    from_mapping,
    load,
    parse_duration,
    parse_hostport,
    parse_size,
)
from smtpbalancer.errors import ConfigError

RELAY_A = {"name": "relay-a", "address": "10.0.0.1:25"}


def problems_of(raw: Mapping[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        from_mapping(raw)
    return caught.value.problems


# --- value parsers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("5d", 432_000.0),
        ("1.5s", 1.5),
        (" 10s ", 10.0),
        ("90", 90.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("bad", ["", "s", "30x", "thirty", "-5s", "5 s s", "1e3s", True, None, -1])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100KB", 100_000),
        ("50MB", 50_000_000),
        ("2GB", 2_000_000_000),
        ("1KiB", 1024),
        ("1MiB", 2**20),
        ("1GiB", 2**30),
        ("100kb", 100_000),
        ("1.5KB", 1500),
        ("512B", 512),
        ("512", 512),
        (1234, 1234),
        (0, 0),
    ],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("bad", ["", "MB", "10XB", "ten MB", "-1KB", 1.5, True, None, -1])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "hostport"),
    [
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("[::1]:25", ("::1", 25)),
        ("mx.example.test:587", ("mx.example.test", 587)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_hostport(text: str, hostport: tuple[str, int]) -> None:
    assert parse_hostport(text) == hostport


@pytest.mark.parametrize(
    "bad", ["x", "x:", ":25", "host:port", "host:-1", "host:65536", "host:2 5", 25, None]
)
def test_parse_hostport_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_hostport(bad)


# --- problems name their key paths -------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"upstream": [RELAY_A], "bogus": 1}, "bogus: unknown key"),
        ({"upstream": [RELAY_A], "server": {"wat": 1}}, "server.wat: unknown key"),
        ({"upstream": [{**RELAY_A, "wieght": 2}]}, "upstream[0].wieght: unknown key"),
        ({"upstream": [{**RELAY_A, "weight": -1}]}, "upstream[0].weight: must be ≥ 0"),
        ({"upstream": [{**RELAY_A, "weight": "5"}]}, "upstream[0].weight: must be an integer"),
        ({"upstream": [{**RELAY_A, "backup": "yes"}]}, "upstream[0].backup: must be true or false"),
        (
            {"upstream": [RELAY_A, {"name": "relay-b"}]},
            "upstream[1].address: is required",
        ),
        ({"upstream": [{"address": "10.0.0.1:25"}]}, "upstream[0].name: is required"),
        (
            {"upstream": [RELAY_A, {**RELAY_A, "address": "10.0.0.2:25"}]},
            "upstream[1].name: duplicate upstream name 'relay-a'",
        ),
        (
            {"upstream": [{**RELAY_A, "name": "relay a"}]},
            "upstream[0].name: use letters, digits, '.', '_' or '-'",
        ),
        ({}, "upstream: at least one [[upstream]] is required"),
        ({"upstream": RELAY_A}, "upstream: must be an array of tables ([[upstream]])"),
        (
            {"upstream": [{**RELAY_A, "weight": 0}, {"name": "b", "address": "h:25", "weight": 0}]},
            "upstream: at least one upstream needs weight > 0",
        ),
        (
            {"upstream": [RELAY_A], "delivery": {"retry_initial": "10m", "retry_max": "5m"}},
            "delivery.retry_max: must be ≥ delivery.retry_initial",
        ),
        (
            {"upstream": [RELAY_A], "delivery": {"retry_initial": "0s"}},
            "delivery.retry_initial: must be > 0",
        ),
        (
            {"upstream": [RELAY_A], "server": {"allow_networks": ["10.0.0.0/8", "nope"]}},
            "server.allow_networks[1]: not a network: 'nope'",
        ),
        (
            {"upstream": [RELAY_A], "server": {"allow_networks": "10.0.0.0/8"}},
            "server.allow_networks: must be a list of CIDR strings",
        ),
        ({"upstream": [RELAY_A], "server": {"hostname": "a b"}}, "server.hostname: must not"),
        ({"upstream": [RELAY_A], "server": {"max_recipients": 0}}, "server.max_recipients: must"),
        ({"upstream": [RELAY_A], "server": {"listen": "nohost"}}, "server.listen: expected"),
        ({"upstream": [RELAY_A], "spool": {"max_size": "lots"}}, "spool.max_size: expected"),
        ({"upstream": [RELAY_A], "server": 5}, "server: must be a table"),
        ({"upstream": [RELAY_A], "metrics": {"port": 1}}, "metrics.port: unknown key"),
        (
            {"upstream": [RELAY_A], "circuit_breaker": {"failure_threshold": 0}},
            "circuit_breaker.failure_threshold: must be ≥ 1",
        ),
    ],
)
def test_problem_names_its_key_path(raw: Mapping[str, object], problem: str) -> None:
    found = problems_of(raw)
    assert any(p.startswith(problem) for p in found), found


def test_all_problems_are_reported_together() -> None:
    raw = {
        "bogus": 1,
        "server": {"wat": 1, "allow_networks": ["10.0.0.0/8", "nope"]},
        "upstream": [{**RELAY_A, "weight": -1}, {"name": "relay-a"}],
    }
    assert problems_of(raw) == [
        "bogus: unknown key",
        "server.allow_networks[1]: not a network: 'nope'",
        "server.wat: unknown key",
        "upstream[0].weight: must be ≥ 0",
        "upstream[1].address: is required",
        "upstream[1].name: duplicate upstream name 'relay-a'",
    ]


def test_config_error_message_joins_the_problems() -> None:
    with pytest.raises(ConfigError, match=r"^bogus: unknown key; server\.wat: unknown key$"):
        from_mapping({"bogus": 1, "server": {"wat": 1}, "upstream": [RELAY_A]})


def test_an_empty_upstream_list_is_rejected() -> None:
    assert problems_of({"upstream": []}) == ["upstream: at least one [[upstream]] is required"]


# --- defaults and accepted keys ------------------------------------------------------


def test_omitted_sections_take_their_defaults() -> None:
    cfg = from_mapping({"upstream": [RELAY_A]}, source="test")
    assert cfg.server == ServerConfig(hostname=cfg.server.hostname)
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 2525)
    assert cfg.server.allow_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert cfg.spool == SpoolConfig()
    assert cfg.delivery == DeliveryConfig(
        retry_initial_s=30.0, retry_max_s=900.0, max_lifetime_s=432_000.0, timeout_s=60.0
    )
    assert cfg.metrics == MetricsConfig(host="127.0.0.1", port=9465, enabled=True)
    assert cfg.health_check == HealthCheckConfig()
    assert cfg.circuit_breaker == BreakerConfig(failure_threshold=5, open_for_s=30.0)
    assert cfg.source == "test"
    (relay,) = cfg.upstreams
    assert (relay.name, relay.host, relay.port, relay.endpoint) == (
        "relay-a",
        "10.0.0.1",
        25,
        "10.0.0.1:25",
    )
    assert (relay.weight, relay.max_connections, relay.max_messages_per_connection) == (1, 10, 100)
    assert relay.backup is False


def test_every_section_is_read(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("s3cret\n")
    cfg = from_mapping(
        {
            "server": {
                "listen": "[::]:25",
                "hostname": "relay.example.test",
                "max_message_size": "10MB",
                "max_recipients": 50,
                "max_connections": 20,
                "allow_networks": ["10.0.0.0/8", "2001:db8::1/64"],
                "idle_timeout": "2m",
                "drain_timeout": "5s",
            },
            "spool": {"directory": "/tmp/spool", "max_size": "1GiB"},
            "delivery": {
                "retry_initial": "1m",
                "retry_max": "1h",
                "max_lifetime": "2d",
                "timeout": "90s",
            },
            "metrics": {"listen": "0.0.0.0:9100", "admin_token_file": str(token)},
            "health_check": {"interval": "10s", "timeout": "3s", "fall": 2, "rise": 4},
            "circuit_breaker": {"failure_threshold": 3, "open_for": "1m"},
            "upstream": [
                {**RELAY_A, "weight": 3, "max_connections": 4, "max_messages_per_connection": 7},
                {"name": "spare", "address": "[2001:db8::25]:2525", "backup": True},
            ],
        }
    )
    assert cfg.server == ServerConfig(
        host="::",
        port=25,
        hostname="relay.example.test",
        max_message_size_bytes=10_000_000,
        max_recipients=50,
        max_connections=20,
        allow_networks=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("2001:db8::/64"),  # strict=False: host bits dropped
        ),
        idle_timeout_s=120.0,
        drain_timeout_s=5.0,
    )
    assert cfg.spool == SpoolConfig(directory=Path("/tmp/spool"), max_size_bytes=2**30)
    assert cfg.delivery == DeliveryConfig(
        retry_initial_s=60.0, retry_max_s=3600.0, max_lifetime_s=172_800.0, timeout_s=90.0
    )
    assert cfg.metrics == MetricsConfig(
        host="0.0.0.0", port=9100, enabled=True, admin_token="s3cret"
    )
    assert cfg.health_check == HealthCheckConfig(interval_s=10.0, timeout_s=3.0, fall=2, rise=4)
    assert cfg.circuit_breaker == BreakerConfig(failure_threshold=3, open_for_s=60.0)
    primary, spare = cfg.upstreams
    assert (primary.weight, primary.max_connections, primary.max_messages_per_connection) == (
        3,
        4,
        7,
    )
    assert primary.backup is False
    assert (spare.host, spare.port, spare.weight, spare.backup) == ("2001:db8::25", 2525, 1, True)


def test_empty_metrics_listen_disables_metrics() -> None:
    cfg = from_mapping({"metrics": {"listen": ""}, "upstream": [RELAY_A]})
    assert cfg.metrics.enabled is False


def test_a_zero_weight_upstream_is_allowed_beside_a_weighted_one() -> None:
    cfg = from_mapping({"upstream": [RELAY_A, {"name": "idle", "address": "h:25", "weight": 0}]})
    assert [u.weight for u in cfg.upstreams] == [1, 0]


# --- load() -------------------------------------------------------------------------------


def test_load_reads_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "smtpbalancer.toml"
    path.write_text(
        """
[server]
listen = "127.0.0.1:2526"
allow_networks = ["192.0.2.0/24"]

[metrics]
listen = ""

[health_check]
interval = "2s"
timeout = "1s"

[circuit_breaker]
failure_threshold = 2
open_for = "45s"

[[upstream]]
name = "relay-a"
address = "10.0.0.1:25"
weight = 5

[[upstream]]
name = "relay-b"
address = "10.0.0.2:25"
backup = true
""",
        encoding="utf-8",
    )
    cfg = load(path)
    assert cfg.source == str(path)
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 2526)
    assert cfg.server.allow_networks == (ipaddress.ip_network("192.0.2.0/24"),)
    assert cfg.metrics.enabled is False
    assert (cfg.health_check.interval_s, cfg.health_check.timeout_s) == (2.0, 1.0)
    assert cfg.circuit_breaker == BreakerConfig(failure_threshold=2, open_for_s=45.0)
    assert [(u.name, u.weight, u.backup) for u in cfg.upstreams] == [
        ("relay-a", 5, False),
        ("relay-b", 1, True),
    ]


def test_load_reports_invalid_toml_as_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[server\nlisten = ", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(path)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: not valid TOML: ")


def test_load_reports_a_missing_file_as_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_load_reports_problems_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nwat = 1\n\n[[upstream]]\nname = "a"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems == ["server.wat: unknown key", "upstream[0].address: is required"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1])
def test_durations_must_be_finite_and_not_negative(value: float) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_an_admin_listener_off_loopback_needs_a_token(tmp_path: Path) -> None:
    assert problems_of({"metrics": {"listen": "0.0.0.0:9100"}, "upstream": [RELAY_A]}) == [
        "metrics.admin_token_file: required when metrics.listen is not on loopback"
    ]
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    assert problems_of({"metrics": {"admin_token_file": str(empty)}, "upstream": [RELAY_A]}) == [
        f"metrics.admin_token_file: {empty} is empty"
    ]
