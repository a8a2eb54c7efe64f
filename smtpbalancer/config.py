"""Config: TOML in, a frozen dataclass tree out.

Parsed once at the edge. Every problem names its key path
(`upstream[0].weight: must be >= 0`) and all problems are reported together.
Unknown keys are errors. Units live in the field names (`_s`, `_bytes`).
Durations: a number of seconds or "250ms", "30s", "15m", "2h", "5d".
Sizes: an integer of bytes or "100KB", "50MB", "1GiB" (KB/MB/GB are powers of
1000, KiB/MiB/GiB powers of 1024).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

from smtpbalancer import passwords
from smtpbalancer.envelope import DEFAULT_POOL
from smtpbalancer.errors import ConfigError

T = TypeVar("T")
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class FreeSpace:
    """A free-disk floor: absolute bytes, or a percentage of the file system."""

    bytes: int = 0
    percent: float = 0.0

    def floor(self, total_bytes: int) -> int:
        return max(self.bytes, int(total_bytes * self.percent / 100.0))


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 2525
    hostname: str = field(default_factory=socket.gethostname)
    max_message_size_bytes: int = 50_000_000
    max_recipients: int = 1000
    max_connections: int = 1000
    max_connections_per_client: int = 50
    allow_networks: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    idle_timeout_s: float = 300.0
    drain_timeout_s: float = 30.0
    # Relay processes sharing the SMTP port (SO_REUSEPORT), one spool shard each (workers.py).
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Line discipline and session bounds (frontend/guard.py, frontend/hardening.py).
    data_timeout_s: float = 600.0  # the whole DATA phase, from the DATA command to the final dot
    greet_pause_s: float = 0.0  # wait this long before the greeting; talkers get 554 (0 = off)
    max_unknown_commands: int = 5  # unknown or malformed command lines, then 421 4.7.0 + close
    proxy_protocol: bool = False  # every connection starts with a PROXY v1/v2 header
    trusted_proxies: tuple[Network, ...] = ()  # the only peers allowed to send that header
    # Inbound TLS and AUTH (frontend/auth.py, tls.py): STARTTLS when cert and key are set,
    # an implicit-TLS listener on tls_listen, AUTH PLAIN/LOGIN (after TLS) when users_file is set.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_listen: tuple[str, int] | None = None
    users_file: Path | None = None
    auth_max_failures: int = 3  # per connection; that failure is answered 421 4.7.0 + close
    auth_max_failures_per_client: int = 10  # per IP within auth_failure_window
    auth_failure_window_s: float = 300.0
    auth_failure_delay_s: float = 1.0  # before each failure reply

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolConfig:
    directory: Path = Path("/var/spool/smtpbalancer")
    max_size_bytes: int = 10_000_000_000
    min_free_disk: FreeSpace = field(default_factory=lambda: FreeSpace(percent=5.0))
    tarpit_above_percent: float = 80.0  # of max_size; 0 disables the tarpit
    tarpit_delay_s: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryConfig:
    retry_initial_s: float = 30.0
    retry_max_s: float = 900.0
    max_lifetime_s: float = 5 * 86400.0
    timeout_s: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9465
    enabled: bool = True
    admin_token: str | None = field(default=None, repr=False)  # read from admin_token_file


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheckConfig:
    interval_s: float = 5.0
    timeout_s: float = 5.0
    fall: int = 3
    rise: int = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerConfig:
    failure_threshold: int = 5
    open_for_s: float = 30.0
    max_open_for_s: float = 300.0  # open_for doubles on each re-open up to this


class UpstreamTls(enum.StrEnum):
    """How an upstream session is protected (`[[upstream]] tls`)."""

    NONE = "none"  # plaintext, never STARTTLS
    STARTTLS = "starttls"  # required: not offered or a failed handshake breaks the session
    IMPLICIT = "implicit"  # TLS from the first byte (port 465 style)
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when advertised, plaintext otherwise


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    name: str
    host: str
    port: int
    weight: int = 1  # 0 = never selected
    max_connections: int = 10
    max_messages_per_connection: int = 100
    max_recipients_per_message: int = 50  # larger envelopes are split (SES takes 50)
    backup: bool = False
    pool: str = "default"  # the named pool it serves (routes pick a pool per message)
    rate_per_s: float | None = None  # from "14/s", "600/m", "1000/h"; None = unlimited
    daily_quota: int | None = None  # messages per rolling 24 h; None = unlimited
    slow_start_s: float = 30.0
    tls: UpstreamTls = UpstreamTls.OPPORTUNISTIC
    tls_verify: bool = True  # chain and host name (the address host) are checked
    tls_ca: Path | None = None  # trust only this CA bundle; None = the system store
    username: str | None = None  # AUTH after TLS; never mixed: each upstream has its own pool
    password: str | None = field(default=None, repr=False)  # from password_env / password_file

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """`[pool.NAME]`: what a pool does when none of its upstreams is eligible."""

    name: str
    spill: str | None = None  # try this pool's upstreams instead; None = hold in the spool


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    """`[[route]]`: every condition given must match; first matching route wins."""

    pool: str
    header_name: str | None = None  # e.g. "X-Pool" (case-insensitive)
    header_value: str | None = None  # glob, case-insensitive
    keep_header: bool = False  # else the routing header is removed before relaying
    user: str | None = None  # glob on the AUTH user
    sender: str | None = None  # glob on the envelope sender, case-insensitive
    recipient_domain: str | None = None  # glob; every recipient's domain must match

    @property
    def unconditional(self) -> bool:
        return not (self.header_name or self.user or self.sender or self.recipient_domain)


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsConfig:
    """`[events]`: per-recipient delivery events POSTed (signed, batched) to the ESP."""

    webhook_url: str | None = None
    secret: str | None = field(default=None, repr=False)  # from secret_file / secret_env
    batch_size: int = 100
    flush_interval_s: float = 1.0  # a partial batch waits at most this long
    timeout_s: float = 10.0
    retry_max_s: float = 300.0
    copy_headers: tuple[str, ...] = ()  # e.g. ("X-Campaign-ID",): copied into every event
    incident_url: str | None = None  # breaker, all-down and backpressure events go here

    @property
    def enabled(self) -> bool:
        return self.webhook_url is not None or self.incident_url is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class DedupeConfig:
    """`[dedupe]`: a resend of an accepted message inside `window_s` is acked, not queued."""

    window_s: float = 0.0  # 0 = off
    max_entries: int = 1_000_000  # memory bound; the oldest are forgotten first

    @property
    def enabled(self) -> bool:
        return self.window_s > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    server: ServerConfig
    spool: SpoolConfig
    delivery: DeliveryConfig
    metrics: MetricsConfig
    health_check: HealthCheckConfig
    circuit_breaker: BreakerConfig
    upstreams: tuple[UpstreamConfig, ...]
    pools: tuple[PoolConfig, ...] = ()  # every pool an upstream names, in first-seen order
    routes: tuple[RouteConfig, ...] = ()
    events: EventsConfig = field(default_factory=EventsConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    source: str = "<defaults>"

    def pool(self, name: str) -> PoolConfig:
        return next((p for p in self.pools if p.name == name), PoolConfig(name=name))

    @property
    def fallback_pool(self) -> str:
        return fallback_pool([p.name for p in self.pools])


def fallback_pool(pools: Sequence[str]) -> str:
    """The pool for mail no route claims (and for mail spooled for a pool since removed):
    "default" when an upstream serves it, else the first pool the config names."""
    if not pools or DEFAULT_POOL in pools:
        return DEFAULT_POOL
    return pools[0]


# --- value parsers (shared with the CLI) -------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (found := _DURATION.match(value)):
        seconds = float(found.group(1)) * _DURATION_UNITS[found.group(2)]
    else:
        raise ValueError(
            f"expected a duration like '250ms', '30s', '15m', '2h', '5d', got {value!r}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("must be a finite number >= 0")
    return seconds


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size like 50MB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (found := _SIZE.match(value)):
        size = int(float(found.group(1)) * _SIZE_UNITS[(found.group(2) or "B").upper()])
    else:
        raise ValueError(f"expected bytes or a size like '100KB', '50MB', '1GiB', got {value!r}")
    if size < 0:
        raise ValueError("must be >= 0")
    return size


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h|d)\s*$")
_RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_rate(value: object) -> float:
    """ "14/s", "600/m", "1000/h", "10000/d" -> messages per second."""
    found = _RATE.match(value) if isinstance(value, str) else None
    if not found:
        raise ValueError(f"expected a rate like '14/s', '600/m' or '1000/h', got {value!r}")
    per_s = float(found.group(1)) / _RATE_PERIODS[found.group(2)]
    if per_s <= 0:
        raise ValueError("must be > 0")
    return per_s


def parse_free_space(value: object) -> FreeSpace:
    """ "10%" of the file system, or a size ("2GB", bytes)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            percent = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"expected a percentage like '10%', got {value!r}") from None
        if not 0 <= percent < 100:
            raise ValueError("a percentage must be in [0, 100)")
        return FreeSpace(percent=percent)
    return FreeSpace(bytes=parse_size(value))


def parse_percent(value: object) -> float:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            percent = float(value.strip()[:-1])
        except ValueError:
            percent = -1.0
        if 0 <= percent <= 100:
            return percent
    raise ValueError(f"expected a percentage like '80%', got {value!r}")


def parse_hostport(value: object) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port). Port 0 means an ephemeral port."""
    if not isinstance(value, str):
        raise ValueError(f"expected 'host:port', got {value!r}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected 'host:port', got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


# --- the reader ----------------------------------------------------------------


class _Keys:
    """Reads one TOML table, remembers what was read, collects problems with key paths."""

    def __init__(self, raw: object, where: str, problems: list[str]) -> None:
        self._where = where
        self._problems = problems
        self._seen: set[str] = set()
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            problems.append(f"{where}: must be a table")
            raw = {}
        self._raw: Mapping[str, object] = raw

    def _path(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def _get(self, key: str) -> object | None:
        self._seen.add(key)
        return self._raw.get(key)

    def problem(self, key: str, text: str) -> None:
        self._problems.append(f"{self._path(key)}: {text}")

    def text(self, key: str, default: str | None = None) -> str:
        value = self._get(key)
        if value is None:
            if default is None:
                self.problem(key, "is required")
                return ""
            return default
        if not isinstance(value, str) or not value.strip():
            self.problem(key, "must be a non-empty string")
            return default or ""
        return value

    def integer(self, key: str, default: int, low: int | None = None) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, "must be an integer")
            return default
        if low is not None and value < low:
            self.problem(key, f"must be ≥ {low}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(key, "must be true or false")
            return default
        return value

    def _convert(self, key: str, default: T, parse: Callable[[object], T]) -> T:
        value = self._get(key)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError as exc:
            self.problem(key, str(exc))
            return default

    def duration(self, key: str, default: float, positive: bool = False) -> float:
        seconds = self._convert(key, default, parse_duration)
        if positive and seconds <= 0:
            self.problem(key, "must be > 0")
            return default
        return seconds

    def size(self, key: str, default: int) -> int:
        return self._convert(key, default, parse_size)

    def optional_rate(self, key: str) -> float | None:
        return self._convert(key, None, parse_rate)

    def optional_integer(self, key: str, low: int) -> int | None:
        if self._raw.get(key) is None:
            self._get(key)
            return None
        return self.integer(key, low, low=low)

    def hostport(self, key: str, default: tuple[str, int] | None) -> tuple[str, int]:
        if self._raw.get(key) is None and default is None:
            self._get(key)
            self.problem(key, "is required")
            return ("", 0)
        return self._convert(key, default or ("", 0), parse_hostport)

    def networks(self, key: str, default: tuple[Network, ...]) -> tuple[Network, ...]:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(key, "must be a list of CIDR strings")
            return default
        nets: list[Network] = []
        for i, item in enumerate(value):
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self._problems.append(f"{self._path(key)}[{i}]: not a network: {item!r}")
        return tuple(nets)

    def reject_unknown(self) -> None:
        for key in self._raw:
            if key not in self._seen:
                self._problems.append(f"{self._path(key)}: unknown key")


_SECTIONS = (
    "server",
    "spool",
    "delivery",
    "metrics",
    "health_check",
    "circuit_breaker",
    "upstream",
    "pool",
    "route",
    "events",
    "dedupe",
)


def load(path: Path) -> Config:
    """Read and validate a TOML file. Raises ConfigError naming every bad key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return from_mapping(raw, source=str(path))


def from_mapping(raw: Mapping[str, object], source: str = "<mapping>") -> Config:
    problems: list[str] = []
    for key in raw:
        if key not in _SECTIONS:
            problems.append(f"{key}: unknown key")
    cfg = Config(
        server=_server(_Keys(raw.get("server"), "server", problems)),
        spool=_spool(_Keys(raw.get("spool"), "spool", problems)),
        delivery=_delivery(_Keys(raw.get("delivery"), "delivery", problems)),
        metrics=_metrics(_Keys(raw.get("metrics"), "metrics", problems)),
        health_check=_health(_Keys(raw.get("health_check"), "health_check", problems)),
        circuit_breaker=_breaker(_Keys(raw.get("circuit_breaker"), "circuit_breaker", problems)),
        upstreams=(upstreams := _upstreams(raw.get("upstream"), problems)),
        pools=_pools(raw.get("pool"), upstreams, problems),
        routes=_routes(raw.get("route"), upstreams, problems),
        events=_events(_Keys(raw.get("events"), "events", problems)),
        dedupe=_dedupe(_Keys(raw.get("dedupe"), "dedupe", problems)),
        source=source,
    )
    if cfg.delivery.retry_max_s < cfg.delivery.retry_initial_s:
        problems.append("delivery.retry_max: must be ≥ delivery.retry_initial")
    if problems:
        raise ConfigError(problems)
    return cfg


def _server(keys: _Keys) -> ServerConfig:
    d = ServerConfig()
    host, port = keys.hostport("listen", (d.host, d.port))
    cfg = ServerConfig(
        host=host,
        port=port,
        hostname=keys.text("hostname", d.hostname),
        max_message_size_bytes=keys.size("max_message_size", d.max_message_size_bytes),
        max_recipients=keys.integer("max_recipients", d.max_recipients, low=1),
        max_connections=keys.integer("max_connections", d.max_connections, low=1),
        max_connections_per_client=keys.integer(
            "max_connections_per_client", d.max_connections_per_client, low=1
        ),
        allow_networks=keys.networks("allow_networks", d.allow_networks),
        idle_timeout_s=keys.duration("idle_timeout", d.idle_timeout_s, positive=True),
        drain_timeout_s=keys.duration("drain_timeout", d.drain_timeout_s),
        workers=keys.integer("workers", d.workers, low=1),
        **_server_security(keys, d),
        **_server_hardening(keys, d),
    )
    if any(c in cfg.hostname for c in " \t\r\n"):
        keys.problem("hostname", "must not contain white space")
    keys.reject_unknown()
    return cfg


def _server_hardening(keys: _Keys, d: ServerConfig) -> dict[str, Any]:
    """Session bounds and PROXY protocol keys of [server]."""
    proxy_protocol = keys.boolean("proxy_protocol", d.proxy_protocol)
    trusted = keys.networks("trusted_proxies", d.trusted_proxies)
    if proxy_protocol and not trusted:
        keys.problem("trusted_proxies", "required when proxy_protocol = true")
    return {
        "data_timeout_s": keys.duration("data_timeout", d.data_timeout_s, positive=True),
        "greet_pause_s": keys.duration("greet_pause", d.greet_pause_s),
        "max_unknown_commands": keys.integer("max_unknown_commands", d.max_unknown_commands, low=1),
        "proxy_protocol": proxy_protocol,
        "trusted_proxies": trusted,
    }


def _server_security(keys: _Keys, d: ServerConfig) -> dict[str, Any]:
    """The TLS and AUTH keys of [server]; the files must exist and load."""
    cert, key = _optional_path(keys, "tls_cert"), _optional_path(keys, "tls_key")
    if (cert is None) != (key is None):
        keys.problem("tls_key" if key is None else "tls_cert", "tls_cert and tls_key go together")
    elif cert is not None and key is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            keys.problem("tls_cert", f"cannot load certificate and key: {exc}")
    tls_listen = None
    if keys._raw.get("tls_listen") is not None:
        tls_listen = keys.hostport("tls_listen", None)
        if cert is None:
            keys.problem("tls_listen", "needs server.tls_cert and server.tls_key")
    users_file = _optional_path(keys, "users_file")
    if users_file is not None:
        if cert is None:
            keys.problem("users_file", "AUTH needs TLS: set server.tls_cert and server.tls_key")
        try:
            passwords.parse_users(users_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            keys.problem("users_file", str(exc))
    return {
        "tls_cert": cert,
        "tls_key": key,
        "tls_listen": tls_listen,
        "users_file": users_file,
        "auth_max_failures": keys.integer("auth_max_failures", d.auth_max_failures, low=1),
        "auth_max_failures_per_client": keys.integer(
            "auth_max_failures_per_client", d.auth_max_failures_per_client, low=1
        ),
        "auth_failure_window_s": keys.duration("auth_failure_window", d.auth_failure_window_s),
        "auth_failure_delay_s": keys.duration("auth_failure_delay", d.auth_failure_delay_s),
    }


def _optional_path(keys: _Keys, key: str) -> Path | None:
    if keys._raw.get(key) is None:
        keys._get(key)
        return None
    return Path(keys.text(key))


def _spool(keys: _Keys) -> SpoolConfig:
    d = SpoolConfig()
    cfg = SpoolConfig(
        directory=Path(keys.text("directory", str(d.directory))),
        max_size_bytes=keys.size("max_size", d.max_size_bytes),
        min_free_disk=keys._convert("min_free_disk", d.min_free_disk, parse_free_space),
        tarpit_above_percent=keys._convert("tarpit_above", d.tarpit_above_percent, parse_percent),
        tarpit_delay_s=keys.duration("tarpit_delay", d.tarpit_delay_s),
    )
    keys.reject_unknown()
    return cfg


def _delivery(keys: _Keys) -> DeliveryConfig:
    d = DeliveryConfig()
    cfg = DeliveryConfig(
        retry_initial_s=keys.duration("retry_initial", d.retry_initial_s, positive=True),
        retry_max_s=keys.duration("retry_max", d.retry_max_s, positive=True),
        max_lifetime_s=keys.duration("max_lifetime", d.max_lifetime_s, positive=True),
        timeout_s=keys.duration("timeout", d.timeout_s, positive=True),
    )
    keys.reject_unknown()
    return cfg


def _metrics(keys: _Keys) -> MetricsConfig:
    d = MetricsConfig()
    token_path = _optional_path(keys, "admin_token_file")
    token = None
    if token_path is not None:
        try:
            token = token_path.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            keys.problem("admin_token_file", f"cannot read {token_path}: {exc.strerror}")
        else:
            if token is None:
                keys.problem("admin_token_file", f"{token_path} is empty")
    if keys._get("listen") == "":
        keys.reject_unknown()
        return MetricsConfig(enabled=False)
    host, port = keys.hostport("listen", (d.host, d.port))
    if token is None and token_path is None and not is_loopback_host(host):
        keys.problem("admin_token_file", "required when metrics.listen is not on loopback")
    keys.reject_unknown()
    return MetricsConfig(host=host, port=port, admin_token=token)


def _health(keys: _Keys) -> HealthCheckConfig:
    d = HealthCheckConfig()
    cfg = HealthCheckConfig(
        interval_s=keys.duration("interval", d.interval_s, positive=True),
        timeout_s=keys.duration("timeout", d.timeout_s, positive=True),
        fall=keys.integer("fall", d.fall, low=1),
        rise=keys.integer("rise", d.rise, low=1),
    )
    keys.reject_unknown()
    return cfg


def _breaker(keys: _Keys) -> BreakerConfig:
    d = BreakerConfig()
    cfg = BreakerConfig(
        failure_threshold=keys.integer("failure_threshold", d.failure_threshold, low=1),
        open_for_s=keys.duration("open_for", d.open_for_s, positive=True),
        max_open_for_s=keys.duration("max_open_for", d.max_open_for_s, positive=True),
    )
    if cfg.max_open_for_s < cfg.open_for_s:
        keys.problem("max_open_for", "must be ≥ circuit_breaker.open_for")
    keys.reject_unknown()
    return cfg


def _upstreams(raw: object, problems: list[str]) -> tuple[UpstreamConfig, ...]:
    if raw is None or raw == []:
        problems.append("upstream: at least one [[upstream]] is required")
        return ()
    if not isinstance(raw, list):
        problems.append("upstream: must be an array of tables ([[upstream]])")
        return ()
    result: list[UpstreamConfig] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        keys = _Keys(item, f"upstream[{i}]", problems)
        host, port = keys.hostport("address", None)
        cfg = UpstreamConfig(
            name=keys.text("name"),
            host=host,
            port=port,
            weight=keys.integer("weight", 1, low=0),
            max_connections=keys.integer("max_connections", 10, low=1),
            max_messages_per_connection=keys.integer("max_messages_per_connection", 100, low=1),
            max_recipients_per_message=keys.integer("max_recipients_per_message", 50, low=1),
            backup=keys.boolean("backup", False),
            pool=keys.text("pool", DEFAULT_POOL),
            rate_per_s=keys.optional_rate("rate"),
            daily_quota=keys.optional_integer("daily_quota", low=1),
            slow_start_s=keys.duration("slow_start", 30.0),
            **_upstream_security(keys, host),
        )
        keys.reject_unknown()
        if cfg.name in names:
            keys.problem("name", f"duplicate upstream name {cfg.name!r}")
        if cfg.name and not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.name):
            keys.problem("name", "use letters, digits, '.', '_' or '-'")
        names.add(cfg.name)
        result.append(cfg)
    if raw and not any(u.weight > 0 for u in result):
        problems.append("upstream: at least one upstream needs weight > 0")
    return tuple(result)


# --- pools, routes, events, dedupe -------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _pools(
    raw: object, upstreams: tuple[UpstreamConfig, ...], problems: list[str]
) -> tuple[PoolConfig, ...]:
    """Every pool an upstream names, with its `[pool.NAME]` settings (spill)."""
    names = list(dict.fromkeys(u.pool for u in upstreams))
    for name in names:
        if not _NAME.fullmatch(name):
            problems.append(f"upstream: pool {name!r}: use letters, digits, '.', '_' or '-'")
    tables: Mapping[str, object] = {}
    if raw is not None and not isinstance(raw, Mapping):
        problems.append("pool: must be a table of pools ([pool.NAME])")
    elif raw is not None:
        tables = raw
    settings: dict[str, PoolConfig] = {}
    for name, table in tables.items():
        keys = _Keys(table, f"pool.{name}", problems)
        spill = keys.text("spill", "") or None
        keys.reject_unknown()
        if name not in names:
            problems.append(f"pool.{name}: no [[upstream]] has pool = {name!r}")
        elif spill is not None and spill not in names:
            keys.problem("spill", f"no [[upstream]] has pool = {spill!r}")
        elif spill == name:
            keys.problem("spill", "a pool cannot spill into itself")
        settings[name] = PoolConfig(name=name, spill=spill)
    return tuple(settings.get(n, PoolConfig(name=n)) for n in names)


def _routes(
    raw: object, upstreams: tuple[UpstreamConfig, ...], problems: list[str]
) -> tuple[RouteConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("route: must be an array of tables ([[route]])")
        return ()
    pools = {u.pool for u in upstreams}
    routes: list[RouteConfig] = []
    for i, item in enumerate(raw):
        keys = _Keys(item, f"route[{i}]", problems)
        pool = keys.text("pool")
        header = keys._get("header")
        header_name = header_value = None
        if header is not None:
            if (
                not isinstance(header, Mapping)
                or set(header) != {"name", "value"}
                or not all(isinstance(v, str) and v for v in header.values())
            ):
                keys.problem("header", 'expected { name = "X-Pool", value = "transactional" }')
            else:
                header_name, header_value = str(header["name"]), str(header["value"])
                if not re.fullmatch(r"[!-9;-~]+", header_name):
                    keys.problem("header", f"not a header field name: {header_name!r}")
        route = RouteConfig(
            pool=pool,
            header_name=header_name,
            header_value=header_value,
            keep_header=keys.boolean("keep_header", False),
            user=keys.text("user", "") or None,
            sender=keys.text("sender", "") or None,
            recipient_domain=keys.text("recipient_domain", "") or None,
        )
        keys.reject_unknown()
        if pool and pool not in pools:
            keys.problem("pool", f"no [[upstream]] has pool = {pool!r}")
        if route.keep_header and header_name is None:
            keys.problem("keep_header", "only means something with header = {...}")
        if routes and routes[-1].unconditional:
            keys.problem("pool", "never used: an earlier route has no condition and matches all")
        routes.append(route)
    return tuple(routes)


def _secret(keys: _Keys, stem: str) -> str | None:
    """A secret named by `<stem>_env` or `<stem>_file`; never inline."""
    env = keys.text(f"{stem}_env", "") or None
    file = keys.text(f"{stem}_file", "") or None
    if env is not None and file is not None:
        keys.problem(f"{stem}_file", f"give {stem}_env or {stem}_file, not both")
        return None
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            keys.problem(f"{stem}_env", f"environment variable {env!r} is not set or empty")
        return value or None
    if file is not None:
        try:
            value = Path(file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            keys.problem(f"{stem}_file", f"cannot read {file}: {why}")
            return None
        if not value:
            keys.problem(f"{stem}_file", f"{file} is empty")
        return value or None
    return None


def _url(keys: _Keys, key: str) -> str | None:
    value = keys.text(key, "") or None
    if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        keys.problem(key, f"expected an http:// or https:// URL, got {value!r}")
    return value


def _events(keys: _Keys) -> EventsConfig:
    d = EventsConfig()
    webhook_url = _url(keys, "webhook_url")
    incident_url = _url(keys, "incident_url")
    secret = _secret(keys, "secret")
    copy = keys._get("copy_headers")
    copy_headers: tuple[str, ...] = ()
    if copy is not None:
        if not isinstance(copy, list) or not all(
            isinstance(h, str) and re.fullmatch(r"[!-9;-~]+", h) for h in copy
        ):
            keys.problem("copy_headers", 'expected a list of header names, e.g. ["X-Campaign-ID"]')
        else:
            copy_headers = tuple(str(h) for h in copy)
    cfg = EventsConfig(
        webhook_url=webhook_url,
        secret=secret,
        batch_size=keys.integer("batch_size", d.batch_size, low=1),
        flush_interval_s=keys.duration("flush_interval", d.flush_interval_s, positive=True),
        timeout_s=keys.duration("timeout", d.timeout_s, positive=True),
        retry_max_s=keys.duration("retry_max", d.retry_max_s, positive=True),
        copy_headers=copy_headers,
        incident_url=incident_url,
    )
    if cfg.enabled and secret is None:
        keys.problem("secret_file", "events are signed: set secret_file or secret_env")
    keys.reject_unknown()
    return cfg


def _dedupe(keys: _Keys) -> DedupeConfig:
    d = DedupeConfig()
    cfg = DedupeConfig(
        window_s=keys.duration("window", d.window_s),
        max_entries=keys.integer("max_entries", d.max_entries, low=1),
    )
    keys.reject_unknown()
    return cfg


# --- outbound TLS and credentials ------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """True for "localhost" and loopback IP literals: the only peers plaintext AUTH may go to."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_upstream_tls(value: object) -> UpstreamTls:
    for mode in UpstreamTls:
        if value == mode.value:
            return mode
    choices = ", ".join(repr(m.value) for m in UpstreamTls)
    raise ValueError(f"expected one of {choices}, got {value!r}")


def _upstream_security(keys: _Keys, host: str) -> dict[str, Any]:
    """tls, tls_verify, tls_ca, username and the password (resolved from env or file)."""
    tls = keys._convert("tls", UpstreamTls.OPPORTUNISTIC, parse_upstream_tls)
    verify = keys.boolean("tls_verify", True)
    ca_text = keys.text("tls_ca", "")
    ca = Path(ca_text) if ca_text else None
    if ca is not None:
        if tls is UpstreamTls.NONE:
            keys.problem("tls_ca", 'has no effect with tls = "none"')
        elif not verify:
            keys.problem("tls_ca", "has no effect with tls_verify = false")
        else:
            _check_ca_file(keys, ca)
    username = keys.text("username", "") or None
    password = _password(keys, username)
    if username is not None and tls is UpstreamTls.NONE and not is_loopback_host(host):
        keys.problem(
            "tls",
            'credentials would cross the network in clear: use tls = "starttls" or "implicit"'
            " (plaintext AUTH is allowed only to a loopback address)",
        )
    return {
        "tls": tls,
        "tls_verify": verify,
        "tls_ca": ca,
        "username": username,
        "password": password,
    }


def _check_ca_file(keys: _Keys, ca: Path) -> None:
    try:
        ssl.create_default_context(cafile=ca)
    except ssl.SSLError:  # before OSError, its base class
        keys.problem("tls_ca", f"{ca} holds no usable PEM certificate")
    except OSError as exc:
        keys.problem("tls_ca", f"cannot read {ca}: {exc.strerror}")


def _password(keys: _Keys, username: str | None) -> str | None:
    """The secret named by password_env or password_file; never an inline `password`."""
    inline = keys._raw.get("password") is not None
    if inline:
        keys._get("password")
        keys.problem(
            "password",
            'inline passwords are not accepted: use password_env = "VAR" or'
            ' password_file = "/path"',
        )
    env = keys.text("password_env", "") or None
    file = keys.text("password_file", "") or None
    if inline and env is None and file is None:
        return None  # one problem is enough
    if env is not None and file is not None:
        keys.problem("password_file", "give password_env or password_file, not both")
        return None
    source = "password_env" if env is not None else "password_file" if file is not None else ""
    if username is None:
        if source:
            keys.problem(source, "needs username")
        return None
    if env is not None:
        secret = os.environ.get(env)
        if not secret:
            keys.problem("password_env", f"environment variable {env!r} is not set or empty")
        return secret or None
    if file is not None:
        try:
            secret = Path(file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            keys.problem("password_file", f"cannot read {file}: {why}")
            return None
        if not secret:
            keys.problem("password_file", f"{file} is empty")
        return secret or None
    keys.problem("username", "needs password_env or password_file")
    return None
