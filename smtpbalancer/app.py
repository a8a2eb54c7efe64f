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
from types import TracebackType

from smtpbalancer import metrics, tls
from smtpbalancer.clock import Clock, SystemClock
from smtpbalancer.config import Config
from smtpbalancer.delivery.dispatcher import Dispatcher
from smtpbalancer.delivery.retry import RetryPolicy
from smtpbalancer.delivery.scheduler import Scheduler
from smtpbalancer.envelope import Envelope, QueueIds
from smtpbalancer.errors import SpoolError
from smtpbalancer.frontend.admission import Limits
from smtpbalancer.frontend.auth import Authenticator
from smtpbalancer.frontend.handler import Handler
from smtpbalancer.frontend.server import FrontEnd
from smtpbalancer.spool import recovery
from smtpbalancer.spool.capacity import Capacity
from smtpbalancer.spool.record import MessageMeta
from smtpbalancer.spool.store import SpoolStore
from smtpbalancer.tasks import cancel_and_wait, spawn
from smtpbalancer.upstream.health import HealthChecker, smtp_probe
from smtpbalancer.upstream.registry import Registry

log = logging.getLogger(__name__)

DELIVERY_FINISH_S = 10.0


class Submitter:
    """The front end's door into the spool: store durably, then schedule delivery."""

    def __init__(self, store: SpoolStore, dispatcher: Dispatcher, clock: Clock) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._clock = clock
        self._ids = QueueIds()
        self.accepted = 0

    def next_queue_id(self) -> str:
        return self._ids.next(self._clock.wall())

    async def submit(self, queue_id: str, envelope: Envelope, body: bytes, client: str) -> None:
        try:
            meta: MessageMeta = await self._store.store(envelope, body, client, queue_id=queue_id)
        except SpoolError:
            metrics.SPOOL_WRITE_ERRORS.inc()
            raise
        self.accepted += 1
        metrics.MESSAGES_RECEIVED.inc()
        self._dispatcher.enqueue(meta, body)


class App:
    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        cfg = config
        self.store = SpoolStore(cfg.spool.directory, self.clock)
        self.registry = Registry(
            cfg.upstreams,
            cfg.circuit_breaker,
            self.clock,
            local_hostname=cfg.server.hostname,
            timeout_s=cfg.delivery.timeout_s,
        )
        self.health = HealthChecker(
            {
                u.name: smtp_probe(
                    u.host,
                    u.port,
                    local_hostname=cfg.server.hostname,
                    timeout_s=cfg.health_check.timeout_s,
                    security=self.registry[u.name].security,  # same TLS, never AUTH
                )
                for u in cfg.upstreams
            },
            interval_s=cfg.health_check.interval_s,
            fall=cfg.health_check.fall,
            rise=cfg.health_check.rise,
            on_change=self.registry.on_health,
            clock=self.clock,
        )
        self.scheduler = Scheduler(self.clock)
        self.dispatcher = Dispatcher(
            store=self.store,
            registry=self.registry,
            scheduler=self.scheduler,
            policy=RetryPolicy(
                cfg.delivery.retry_initial_s, cfg.delivery.retry_max_s, cfg.delivery.max_lifetime_s
            ),
            clock=self.clock,
            hostname=cfg.server.hostname,
            concurrency=sum(u.max_connections for u in cfg.upstreams),
        )
        self.submitter = Submitter(self.store, self.dispatcher, self.clock)
        self.capacity = Capacity(cfg.spool, lambda: self.store.bytes, self.clock)
        self.tls_context, self.authenticator = self._security()
        self.handler = Handler(
            hostname=cfg.server.hostname,
            limits=Limits(
                cfg.server.max_recipients,
                cfg.server.allow_networks,
                tarpit_above_percent=cfg.spool.tarpit_above_percent,
                tarpit_delay_s=cfg.spool.tarpit_delay_s,
                auth_offered=self.authenticator is not None,
            ),
            submitter=self.submitter,
            pressure=self.capacity,
            clock=self.clock,
            auth=self.authenticator,
        )
        self.frontend = FrontEnd(
            cfg.server,
            self.handler,
            self.clock,
            tls=self.tls_context,
            auth=self.authenticator is not None,
        )
        self.smtp_address: tuple[str, int] = ("", 0)
        self.metrics_address: tuple[str, int] | None = None
        self.recovered = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: object = None
        self._stop_requested = asyncio.Event()

    def __repr__(self) -> str:
        return f"<App {self.frontend!r} {self.dispatcher!r} {self.store!r}>"

    async def start(self) -> None:
        self.store.open()
        try:
            found = await asyncio.to_thread(recovery.scan, self.store)
        except BaseException:
            self.store.close()
            raise
        for meta, progress in found.messages:
            self.dispatcher.enqueue(meta, None, progress)
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
        self._tasks.append(spawn(self.health.run(), name="health-checker"))

        await self.capacity.refresh()  # free disk is known before the first MAIL
        self._tasks.append(spawn(self.capacity.run(), name="spool-capacity"))

        if self.config.metrics.enabled:
            server, _ = metrics.serve(self.config.metrics.host, self.config.metrics.port)
            self._metrics_server = server
            self.metrics_address = (self.config.metrics.host, server.server_port)
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

    def reload_tls(self) -> bool:
        """SIGHUP: load the certificate and key again into the live context.

        New handshakes use the new certificate; on any error the old one stays and
        the error is logged. Returns True when the new certificate is in use.
        """
        server = self.config.server
        if self.tls_context is None or server.tls_cert is None or server.tls_key is None:
            return False
        try:
            tls.reload_server_context(self.tls_context, server.tls_cert, server.tls_key)
        except (OSError, ssl.SSLError) as exc:
            log.error("tls.reload_failed cert=%s error=%s keeping=old", server.tls_cert, exc)
            return False
        log.info("tls.reloaded cert=%s", server.tls_cert)
        return True

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
        await self.registry.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # type: ignore[attr-defined]
            self._metrics_server.server_close()  # type: ignore[attr-defined]
        await asyncio.to_thread(self.store.close)
        log.info("smtpbalancer.stopped queued=%d", self.store.messages)

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
