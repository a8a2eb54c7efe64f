"""Hot reload: the current config and its generation; validate -> build -> swap.

`diff` and `keep_restart_only` are pure: they compare two Config trees by key
path (`upstream.relay-b.weight`, `upstream.relay-c(added)`, `server.listen`) and
put back the old value of every setting that cannot change without a restart
(the listeners, the spool directory, the metrics/admin listener, turning TLS or
AUTH on or off). `Reloader` is the shell: it re-reads the file, hands the
effective config to the composition root's `apply` (which builds every new
object first and then swaps, raising before any swap on failure), and only then
bumps the generation. On any failure the old config keeps running, every problem
is logged with its key path and `smtpbalancer_config_reload_failures_total`
increments. Secrets are never logged: a changed password shows as its key only.
It never touches sessions, deliveries or the spool itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from smtpbalancer import config, metrics
from smtpbalancer.config import Config, UpstreamConfig
from smtpbalancer.errors import ConfigError

log = logging.getLogger(__name__)

# Dataclass fields that the file spells differently (one file key, several fields).
_ALIASES: Final = {
    ("server", "host"): "listen",
    ("server", "port"): "listen",
    ("metrics", "host"): "listen",
    ("metrics", "port"): "listen",
    ("metrics", "enabled"): "listen",
    ("metrics", "admin_token"): "admin_token_file",
    ("upstream", "host"): "address",
    ("upstream", "port"): "address",
}
# Settings bound to sockets, files or objects built once at start.
RESTART_ONLY: Final = frozenset(
    {
        "server.listen",
        "server.tls_listen",
        "server.workers",
        "spool.directory",
        "metrics.listen",
        "metrics.admin_token_file",
    }
)
_SECTIONS: Final = ("server", "spool", "delivery", "metrics", "health_check", "circuit_breaker")


@dataclass(frozen=True, slots=True)
class Diff:
    """What a reload changes (applied live) and what it ignores until a restart."""

    changed: tuple[str, ...] = ()
    restart_required: tuple[str, ...] = ()


def _fields(section: str, old: object, new: object) -> list[str]:
    keys: list[str] = []
    for f in dataclasses.fields(old):  # type: ignore[arg-type]
        if getattr(old, f.name) != getattr(new, f.name):
            key = _ALIASES.get((section, f.name), f.name)
            if key not in keys:
                keys.append(key)
    return keys


def _upstreams(old: Sequence[UpstreamConfig], new: Sequence[UpstreamConfig]) -> list[str]:
    before = {u.name: u for u in old}
    after = {u.name: u for u in new}
    keys = [f"upstream.{n}(removed)" for n in before if n not in after]
    for name, cfg in after.items():
        if name not in before:
            keys.append(f"upstream.{name}(added)")
        else:
            keys.extend(f"upstream.{name}.{k}" for k in _fields("upstream", before[name], cfg))
    return keys


def diff(old: Config, new: Config) -> Diff:
    """Every differing key path, split into live-applied and restart-required."""
    keys: list[str] = []
    for section in _SECTIONS:
        found = _fields(section, getattr(old, section), getattr(new, section))
        keys.extend(f"{section}.{k}" for k in found)
    keys.extend(_upstreams(old.upstreams, new.upstreams))
    restart = [k for k in keys if k in RESTART_ONLY]
    if old.server.tls_enabled != new.server.tls_enabled:  # STARTTLS on/off: a new listener
        restart.extend(k for k in ("server.tls_cert", "server.tls_key") if k in keys)
    if _auth_toggled(old, new):  # AUTH on/off changes what EHLO offers: a new listener
        restart.append("server.users_file")
    live = tuple(k for k in keys if k not in restart)
    return Diff(changed=live, restart_required=tuple(restart))


def _auth_toggled(old: Config, new: Config) -> bool:
    return (old.server.users_file is None) != (new.server.users_file is None)


def keep_restart_only(old: Config, new: Config) -> Config:
    """`new` with the old value of every restart-only setting (those stay until a restart)."""
    o, n = old.server, new.server
    server = dataclasses.replace(n, host=o.host, port=o.port, tls_listen=o.tls_listen)
    if o.tls_enabled != n.tls_enabled:
        server = dataclasses.replace(server, tls_cert=o.tls_cert, tls_key=o.tls_key)
    if _auth_toggled(old, new):
        server = dataclasses.replace(server, users_file=o.users_file)
    spool = dataclasses.replace(new.spool, directory=old.spool.directory)
    return dataclasses.replace(new, server=server, spool=spool, metrics=old.metrics)


class Reloader:
    """Owns the running config and its generation; `reload` never half-applies."""

    def __init__(
        self,
        current: Config,
        path: Path | None,
        adapt: Callable[[Config], Config] = lambda cfg: cfg,
    ) -> None:
        self.current = current
        self.path = path
        self._adapt = adapt  # a worker's share of the file's config (workers.worker_config)
        self.generation = 1
        self.failures = 0
        self._lock = asyncio.Lock()  # SIGHUP and the admin hook may race
        metrics.CONFIG_GENERATION.set(self.generation)

    def __repr__(self) -> str:
        return f"<Reloader generation={self.generation} failures={self.failures} path={self.path}>"

    async def reload(self, apply: Callable[[Config, Diff], None]) -> str:
        """Re-read the file and apply it; returns the one-line outcome that was logged.

        `apply` must build everything that can fail before it swaps anything, and
        raise (ConfigError, OSError, ssl.SSLError, ValueError) if it cannot.
        """
        async with self._lock:
            if self.path is None:
                return self._refuse(["no config file to reload (started from a mapping)"])
            try:
                loaded = self._adapt(await asyncio.to_thread(config.load, self.path))
            except ConfigError as exc:
                return self._refuse(exc.problems)
            change = diff(self.current, loaded)
            effective = keep_restart_only(self.current, loaded)
            try:
                apply(effective, change)
            except ConfigError as exc:
                return self._refuse(exc.problems)
            except (OSError, ssl.SSLError, ValueError) as exc:
                return self._refuse([f"{type(exc).__name__}: {exc}"])
            self.current = effective
            self.generation += 1
            metrics.CONFIG_GENERATION.set(self.generation)
            line = f"reload generation={self.generation} changed={','.join(change.changed) or '-'}"
            if change.restart_required:
                line += f" restart_required={','.join(change.restart_required)}"
            log.info("%s", line)
            return line

    def _refuse(self, problems: Sequence[str]) -> str:
        self.failures += 1
        metrics.CONFIG_RELOAD_FAILURES.inc()
        for problem in problems:
            log.error("reload.invalid %s", problem)
        line = (
            f"reload failed generation={self.generation} kept=old problems={len(problems)}"
            f" first={problems[0] if problems else '-'}"
        )
        log.error("%s", line)
        return line
