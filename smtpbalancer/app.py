"""Composition root: build every component from Config, start and stop them in order.

Start: spool (lock + recovery) -> upstream registry -> dispatcher -> metrics
-> SMTP listener (accept mail last). Stop (SIGTERM/SIGINT): drain the listener
(new connections get 421 4.3.2, transactions finish within the grace), let
in-flight deliveries finish, close upstream connections, release the spool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from smtpbalancer import __version__, metrics, passwords, tls
from smtpbalancer.admin import AdminApp, AdminHooks, AdminServer, Readiness
from smtpbalancer.clock import Clock, SystemClock
from smtpbalancer.config import Config
from smtpbalancer.delivery.dispatcher import Dispatcher
from smtpbalancer.delivery.retry import RetryPolicy
from smtpbalancer.delivery.scheduler import Scheduler
from smtpbalancer.envelope import Envelope, QueueIds
from smtpbalancer.errors import SpoolError
from smtpbalancer.events.event import IncidentEvent
from smtpbalancer.events.log import EventLog
from smtpbalancer.frontend.admission import Limits
from smtpbalancer.frontend.auth import Authenticator
from smtpbalancer.frontend.dedupe import DedupeWindow
from smtpbalancer.frontend.handler import Handler
from smtpbalancer.frontend.routing import Router
from smtpbalancer.frontend.server import FrontEnd
from smtpbalancer.reload import Diff, Reloader
from smtpbalancer.spool import recovery
from smtpbalancer.spool.capacity import Capacity
from smtpbalancer.spool.record import MessageMeta
from smtpbalancer.spool.store import SpoolStore
from smtpbalancer.tasks import cancel_and_wait, spawn
from smtpbalancer.upstream.health import HealthChecker, Probe, smtp_probe
from smtpbalancer.upstream.registry import Registry, Upstream

log = logging.getLogger(__name__)

DELIVERY_FINISH_S = 10.0


class Submitter:
    """The front end's door into the spool: store durably, then schedule delivery."""

    def __init__(self, store: SpoolStore, dispatcher: Dispatcher, clock: Clock) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._clock = clock
        self._ids = QueueIds()
        self._routed: dict[str, metrics.CounterChild] = {}
        self.accepted = 0

    def next_queue_id(self) -> str:
        return self._ids.next(self._clock.wall())

    def submit_then(
        self,
        queue_id: str,
        envelope: Envelope,
        body: bytes,
        client: str,
        done: Callable[[Exception | None], None],
    ) -> None:
        def stored(meta: MessageMeta, error: SpoolError | None) -> None:
            if error is not None:
                metrics.SPOOL_WRITE_ERRORS.inc()
                done(error)
                return
            try:
                self._stored(meta, body)
            except Exception as exc:  # a bug: the handler answers it as a failed hook
                done(exc)
                return
            done(None)

        self._store.store_then(envelope, body, client, queue_id, stored)

    def _stored(self, meta: MessageMeta, body: bytes) -> None:
        """The message is durable: count it and schedule its delivery."""
        envelope = meta.envelope
        self.accepted += 1
        metrics.MESSAGES_RECEIVED.inc()
        routed = self._routed.get(envelope.pool)
        if routed is None:  # bounded: pools come from the config
            routed = self._routed[envelope.pool] = metrics.MESSAGES_ROUTED.labels(envelope.pool)
        routed.inc()
        self._dispatcher.enqueue(meta, body)


class App:
    def __init__(
        self,
        config: Config,
        clock: Clock | None = None,
        *,
        config_path: Path | None = None,
        adapt: Callable[[Config], Config] | None = None,
        reuse_port: bool = False,
    ) -> None:
        """`adapt` and `reuse_port` make this one of several workers (see workers.py)."""
        self.config = config
        self.clock = clock or SystemClock()
        # SIGHUP / admin: re-read config_path (a worker takes its share of it: adapt)
        self.reloader = Reloader(config, config_path, adapt or (lambda cfg: cfg))
        cfg = config
        self.store = SpoolStore(cfg.spool.directory, self.clock)
        self.registry = Registry(
            cfg.upstreams,
            cfg.circuit_breaker,
            self.clock,
            local_hostname=cfg.server.hostname,
            timeout_s=cfg.delivery.timeout_s,
            pools=cfg.pools,
        )
        self.health = HealthChecker(
            _probes(cfg, self.registry),
            interval_s=cfg.health_check.interval_s,
            fall=cfg.health_check.fall,
            rise=cfg.health_check.rise,
            on_change=self._on_health,
            clock=self.clock,
        )
        self.events = EventLog(cfg.events, cfg.spool.directory / "events", self.clock)
        self._all_down = False
        self.scheduler = Scheduler(self.clock)
        self.dispatcher = Dispatcher(
            store=self.store,
            registry=self.registry,
            scheduler=self.scheduler,
            policy=_retry_policy(cfg),
            clock=self.clock,
            hostname=cfg.server.hostname,
            concurrency=_concurrency(cfg),
            events=self.events,
        )
        self.registry.on_breaker = self._on_breaker
        self.submitter = Submitter(self.store, self.dispatcher, self.clock)
        self.capacity = Capacity(cfg.spool, lambda: self.store.bytes, self.clock)
        self.tls_context, self.authenticator = self._security()
        self.handler = Handler(
            hostname=cfg.server.hostname,
            limits=_limits(cfg, auth_offered=self.authenticator is not None),
            submitter=self.submitter,
            pressure=self.capacity,
            clock=self.clock,
            auth=self.authenticator,
            router=Router(cfg.routes, cfg.fallback_pool),
            dedupe=_dedupe(cfg, None),
            copy_headers=cfg.events.copy_headers,
        )
        self.frontend = FrontEnd(
            cfg.server,
            self.handler,
            self.clock,
            tls=self.tls_context,
            auth=self.authenticator is not None,
            reuse_port=reuse_port,
        )
        self.smtp_address: tuple[str, int] = ("", 0)
        self.metrics_address: tuple[str, int] | None = None
        self.recovered = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._admin: AdminServer | None = None
        self._started_wall = self.clock.wall()
        self._stop_requested = asyncio.Event()

    def __repr__(self) -> str:
        return f"<App {self.frontend!r} {self.dispatcher!r} {self.store!r}>"

    async def start(self) -> None:
        self.store.open()
        try:
            found = await asyncio.to_thread(recovery.scan, self.store)
            await asyncio.to_thread(self.events.open)
        except BaseException:
            self.store.close()
            raise
        for meta, progress in found.messages:
            self.dispatcher.enqueue(meta, None, progress)
        for meta, progress in found.held:  # known, so that a release can schedule them
            self.dispatcher.adopt_held(meta, progress)
        self.recovered = len(found.messages)
        if found.messages or found.removed_temp or found.quarantined:
            log.info(
                "spool.recovered messages=%d temp_removed=%d quarantined=%d",
                len(found.messages),
                found.removed_temp,
                found.quarantined,
            )
        metrics.bind_gauges(
            lambda: float(self.store.messages),
            lambda: float(self.store.bytes),
            lambda: float(len(self.frontend.sessions)),
        )
        self._tasks.append(spawn(self.dispatcher.run(), name="dispatcher"))
        self.events.start()
        self.handler.on_backpressure = self._on_backpressure
        self._tasks.append(spawn(self.health.run(), name="health-checker"))

        await self.capacity.refresh()  # free disk is known before the first MAIL
        self._tasks.append(spawn(self.capacity.run(), name="spool-capacity"))

        self._bind_metrics()
        if self.config.metrics.enabled:
            self._admin = AdminServer(
                AdminApp(
                    self._admin_hooks(), asyncio.get_running_loop(), self.config.metrics.admin_token
                ),
                self.config.metrics.host,
                self.config.metrics.port,
            )
            self._admin.start()
            self.metrics_address = self._admin.address
        self.smtp_address = await self.frontend.start()
        if self.tls_context is not None:
            log.info(
                "smtp.security starttls=on implicit_tls=%s auth=%s",
                "{}:{}".format(*self.frontend.tls_address) if self.frontend.tls_address else "off",
                self.authenticator or "off",
            )
        log.info(
            "smtpbalancer.ready smtp=%s:%d metrics=%s spool=%s upstreams=%d recovered=%d pid=%d",
            *self.smtp_address,
            f"{self.metrics_address[0]}:{self.metrics_address[1]}"
            if self.metrics_address
            else "off",
            self.config.spool.directory,
            len(self.config.upstreams),
            self.recovered,
            os.getpid(),
        )

    def _security(self) -> tuple[ssl.SSLContext | None, Authenticator | None]:
        """The listeners' TLS context and the AUTH users (config validated both files)."""
        server = self.config.server
        context = None
        if server.tls_cert is not None and server.tls_key is not None:
            context = tls.server_context(server.tls_cert, server.tls_key)
        auth = None
        if server.users_file is not None:
            auth = Authenticator.from_file(server.users_file, server, self.clock)
        return context, auth

    async def reload(self) -> str:
        """SIGHUP and the admin hook: re-read the config file; returns the one-line outcome.

        Upstreams (weights, added/removed, limits, TLS, credentials), delivery, health,
        breaker, spool limits, server limits and the listener certificate apply live; the
        listeners, spool directory and metrics listener need a restart (reported, ignored).
        On any error the old config keeps running (invariant 6).
        """
        return await self.reloader.reload(self._apply)

    def _apply(self, cfg: Config, change: Diff) -> None:
        """Build what can fail first (certificate, upstream TLS contexts), then swap."""
        server = cfg.server
        if self.tls_context is not None and server.tls_cert and server.tls_key:
            tls.server_context(server.tls_cert, server.tls_key)  # raises: nothing changed yet
        users = None
        if self.authenticator is not None and server.users_file is not None:
            # Re-read even when the path is unchanged: adding a user is an edit + SIGHUP.
            users = passwords.parse_users(server.users_file.read_text(encoding="utf-8"))
        done = self.registry.reconfigure(
            cfg.upstreams,
            cfg.circuit_breaker,
            local_hostname=server.hostname,
            timeout_s=cfg.delivery.timeout_s,
            pools=cfg.pools,
        )
        # From here on nothing raises: every step is an assignment of a validated value.
        if self.tls_context is not None and server.tls_cert and server.tls_key:
            tls.reload_server_context(self.tls_context, server.tls_cert, server.tls_key)
            log.info("tls.reloaded cert=%s", server.tls_cert)
        self.health.reconfigure(
            _probes(cfg, self.registry),
            fresh=done.rebuilt,
            interval_s=cfg.health_check.interval_s,
            fall=cfg.health_check.fall,
            rise=cfg.health_check.rise,
        )
        self.dispatcher.reconfigure(
            concurrency=_concurrency(cfg),
            policy=_retry_policy(cfg),
            hostname=server.hostname,
        )
        self.capacity.reconfigure(cfg.spool)
        if self.authenticator is not None and users is not None:
            self.authenticator.reconfigure(users, server)
            log.info("auth.users_reloaded users=%d file=%s", len(users), server.users_file)
        self.handler.reconfigure(
            hostname=server.hostname,
            limits=_limits(cfg, auth_offered=self.authenticator is not None),
            router=Router(cfg.routes, cfg.fallback_pool),
            dedupe=_dedupe(cfg, self.handler.dedupe),
            copy_headers=cfg.events.copy_headers,
        )
        self.frontend.reconfigure(server)
        metrics.SPOOL_MAX_BYTES.set(cfg.spool.max_size_bytes)
        self.config = cfg
        if change.restart_required:
            log.warning("reload.restart_required keys=%s", ",".join(change.restart_required))

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def wait_stopped(self) -> None:
        await self._stop_requested.wait()

    async def stop(self) -> None:
        log.info(
            "smtpbalancer.stopping sessions=%d deliveries=%d queued=%d",
            len(self.frontend.sessions),
            self.dispatcher.inflight,
            self.store.messages,
        )
        await self.frontend.stop(self.config.server.drain_timeout_s)
        await cancel_and_wait(self._tasks)
        await self.dispatcher.finish(DELIVERY_FINISH_S)
        await self.events.stop()
        await self.registry.close()
        if self._admin is not None:
            await asyncio.to_thread(self._admin.stop)
        await asyncio.to_thread(self.store.close)
        log.info("smtpbalancer.stopped queued=%d", self.store.messages)

    # --- observability: metrics and the admin listener ------------------------------

    def _bind_metrics(self) -> None:
        metrics.BUILD_INFO.labels(__version__).set(1)
        metrics.SPOOL_MAX_BYTES.set(self.config.spool.max_size_bytes)
        metrics.CONFIG_GENERATION.set(1)
        metrics.QUEUE_OLDEST_AGE.set_function(self._oldest_age_s)
        metrics.SPOOL_FREE_BYTES.set_function(lambda: float(self.capacity.free_disk_bytes))

    def _oldest_age_s(self) -> float:
        oldest = self.store.oldest_arrival()
        return 0.0 if oldest is None else max(0.0, self.clock.wall() - oldest)

    def _admin_hooks(self) -> AdminHooks:
        return AdminHooks(
            status=self.status,
            readiness=self.readiness,
            drain=self.registry.set_drained,
            set_weight=self.registry.set_weight,
            reload=self.reload,
            queue=self.queue_operation,
        )

    async def queue_operation(self, op: str, ids: tuple[str, ...]) -> dict[str, str]:
        """An operator's hold/release/delete/retry on the running instance, per queue id."""
        if op == "retry":
            if not ids:
                return self.dispatcher.retry(None)
            return {k: v for qid in ids for k, v in self.dispatcher.retry(qid).items()}
        act = {
            "hold": self.dispatcher.hold,
            "release": self.dispatcher.release,
            "delete": self.dispatcher.delete,
        }[op]
        results: dict[str, str] = {}
        for qid in ids:
            try:
                results[qid] = await act(qid)
            except SpoolError as exc:
                log.error("queue.%s_failed queue_id=%s error=%s", op, qid, exc)
                results[qid] = f"error: {exc}"
            else:
                if results[qid] not in ("unknown", "busy"):
                    log.warning("queue.%s queue_id=%s by=admin", op, qid)
        return results

    # --- incidents: breaker, all relays down, backpressure (incident_url) ------------

    def _on_health(self, name: str, healthy: bool, reason: str) -> None:
        self.registry.on_health(name, healthy, reason)
        self._check_all_down(f"health check: {name} {'up' if healthy else 'down'}")

    def _on_breaker(self, upstream: Upstream, state: str, reason: str) -> None:
        if state in ("open", "closed"):
            name, pool = upstream.name, upstream.config.pool
            self._incident(f"breaker_{state}", reason, upstream=name, pool=pool)
        self._check_all_down(f"breaker {upstream.name} {state}")

    def _on_backpressure(self, on: bool, detail: str) -> None:
        self._incident("backpressure_on" if on else "backpressure_off", detail)

    def _check_all_down(self, detail: str) -> None:
        down = self.registry.eligible_count(self.clock.monotonic()) == 0
        if down != self._all_down:
            self._all_down = down
            self._incident("all_upstreams_down" if down else "all_upstreams_up", detail)

    def _incident(self, kind: str, detail: str, *, upstream: str = "", pool: str = "") -> None:
        if self.events.wants_incidents:
            event = IncidentEvent(kind, self.clock.wall(), upstream, pool, detail)
            spawn(self.events.emit([event]), name=f"incident:{kind}")

    def readiness(self) -> Readiness:
        """Ready for mail: not draining, spool accepting, at least one relay eligible."""
        if self.frontend.draining:
            return Readiness(False, "draining")
        if not self.capacity.accepting():
            return Readiness(False, "spool full or disk low")
        if self.registry.eligible_count(self.clock.monotonic()) == 0:
            return Readiness(False, "no upstream eligible")
        return Readiness(True)

    def status(self) -> dict[str, object]:
        now = self.clock.monotonic()
        return {
            "version": __version__,
            "uptime_s": round(self.clock.wall() - self._started_wall, 1),
            "ready": self.readiness().ready,
            "sessions": len(self.frontend.sessions),
            "queue": {
                "messages": self.store.messages,
                "bytes": self.store.bytes,
                "oldest_age_s": round(self._oldest_age_s(), 1),
                "parked": self.scheduler.parked,
                "held": self.dispatcher.held,
                "in_flight": self.dispatcher.inflight,
            },
            "spool": {
                "directory": str(self.config.spool.directory),
                "max_bytes": self.config.spool.max_size_bytes,
                "reserved_bytes": self.capacity.reserved_bytes,
                "free_disk_bytes": self.capacity.free_disk_bytes,
            },
            "upstreams": self.registry.status(now),
            "events": self.events.status(),
        }

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _dedupe(cfg: Config, current: DedupeWindow | None) -> DedupeWindow | None:
    """The dedupe memory for `cfg`; a reload keeps what is remembered, with new bounds."""
    if not cfg.dedupe.enabled:
        return None
    if current is None:
        return DedupeWindow(cfg.dedupe.window_s, cfg.dedupe.max_entries)
    current.window_s, current.max_entries = cfg.dedupe.window_s, cfg.dedupe.max_entries
    return current


def _probes(cfg: Config, registry: Registry) -> dict[str, Probe]:
    return {
        u.name: smtp_probe(
            u.host,
            u.port,
            local_hostname=cfg.server.hostname,
            timeout_s=cfg.health_check.timeout_s,
            security=registry[u.name].security,  # same TLS, never AUTH
        )
        for u in cfg.upstreams
    }


def _concurrency(cfg: Config) -> int:
    return sum(u.max_connections for u in cfg.upstreams)


def _retry_policy(cfg: Config) -> RetryPolicy:
    d = cfg.delivery
    return RetryPolicy(d.retry_initial_s, d.retry_max_s, d.max_lifetime_s)


def _limits(cfg: Config, *, auth_offered: bool) -> Limits:
    return Limits(
        cfg.server.max_recipients,
        cfg.server.allow_networks,
        tarpit_above_percent=cfg.spool.tarpit_above_percent,
        tarpit_delay_s=cfg.spool.tarpit_delay_s,
        auth_offered=auth_offered,
    )
