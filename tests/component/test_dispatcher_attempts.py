"""What the dispatcher's attempt does when something unexpected breaks it: the message
stays spooled and is retried later, a recipient an upstream accepted is never sent
again, and a half-open breaker's probe slot is given back. The upstream is a stand-in
for Upstream.send, so each failure lands exactly where the test puts it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.waiting import wait_until

from smtpbalancer.clock import SystemClock
from smtpbalancer.config import BreakerConfig, UpstreamConfig
from smtpbalancer.delivery.dispatcher import Dispatcher
from smtpbalancer.delivery.retry import RetryPolicy
from smtpbalancer.delivery.scheduler import Scheduler
from smtpbalancer.envelope import Envelope
from smtpbalancer.replies import Reply, SendResult
from smtpbalancer.spool.store import SpoolStore
from smtpbalancer.tasks import cancel_and_wait, spawn
from smtpbalancer.upstream.breaker import BreakerState
from smtpbalancer.upstream.registry import Registry

ENV = Envelope("a@sender.test", ("x@rcpt.test", "y@rcpt.test"))
BODY = b"Subject: t\r\n\r\nbody\r\n"
RETRY_S = 0.05


@dataclass
class Relay:
    """Upstream.send's stand-in: records each transaction; fails the first `crashes`."""

    crashes: int = 0
    sent: list[tuple[str, ...]] = field(default_factory=list)
    vouched: list[bool] = field(default_factory=list)  # crlf_clean, per call

    async def send(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        body: bytes,
        *,
        smtputf8: bool,
        body_8bit: bool,
        crlf_clean: bool = False,
    ) -> SendResult:
        self.vouched.append(crlf_clean)
        await asyncio.sleep(0)
        if self.crashes:
            self.crashes -= 1
            raise RuntimeError("a bug in the relay client")
        self.sent.append(tuple(rcpts))
        return SendResult({}, Reply(250, "2.0.0", "Ok: queued as UP1"), "UP1")


@asynccontextmanager
async def running(
    tmp_path: Path, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Dispatcher, SpoolStore, Registry]]:
    clock = SystemClock()
    store = SpoolStore(tmp_path, clock)
    store.open()
    registry = Registry(
        [UpstreamConfig(name="stand-in", host="127.0.0.1", port=9, slow_start_s=0.0)],
        BreakerConfig(failure_threshold=1, open_for_s=0.05),
        clock,
        local_hostname="test",
        timeout_s=5.0,
    )
    monkeypatch.setattr(registry["stand-in"], "send", relay.send)
    dispatcher = Dispatcher(
        store=store,
        registry=registry,
        scheduler=Scheduler(clock),
        policy=RetryPolicy(initial_s=RETRY_S, max_s=1.0, lifetime_s=3600.0),
        clock=clock,
        hostname="test",
        concurrency=4,
    )
    task = spawn(dispatcher.run(), name="dispatcher")
    try:
        yield dispatcher, store, registry
    finally:
        await cancel_and_wait([task])
        await dispatcher.finish(1.0)
        store.close()


async def test_a_crash_in_the_attempt_keeps_the_message_and_retries_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = Relay(crashes=1)
    async with running(tmp_path, relay, monkeypatch) as (dispatcher, store, _):
        meta = await store.store(ENV, BODY)
        dispatcher.enqueue(meta, BODY)
        await wait_until(lambda: dispatcher.completed == 1)
        assert relay.sent == [ENV.rcpt_tos]
        assert dispatcher.attempts == 2 and store.messages == 0


async def test_only_the_copy_never_read_back_is_relayed_without_a_line_end_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot copy is the front end's normalised payload (or a DSN): CRLF-clean by
    construction. A body read back from the spool may predate that normalisation, so the
    relay client counts its line ends again (invariant 7)."""
    relay = Relay(crashes=1)  # the crash drops the hot copy: the retry reads it back
    async with running(tmp_path, relay, monkeypatch) as (dispatcher, store, _):
        meta = await store.store(ENV, BODY)
        dispatcher.enqueue(meta, BODY)
        await wait_until(lambda: dispatcher.completed == 1)
        recovered = await store.store(ENV, BODY)
        dispatcher.enqueue(recovered, None)  # as recovery enqueues: no body in memory
        await wait_until(lambda: dispatcher.completed == 2)
    assert relay.vouched == [True, False, False]


async def test_a_crash_after_the_upstream_accepted_never_resends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = Relay()
    async with running(tmp_path, relay, monkeypatch) as (dispatcher, store, _):
        real = store.remove_soon
        calls: list[str] = []

        def remove_failing_once(meta):  # type: ignore[no-untyped-def]
            calls.append(meta.queue_id)
            if len(calls) == 1:
                raise RuntimeError("a bug while finishing")
            real(meta)

        monkeypatch.setattr(store, "remove_soon", remove_failing_once)
        meta = await store.store(ENV, BODY)
        dispatcher.enqueue(meta, BODY)
        await wait_until(lambda: dispatcher.completed == 1)
        assert relay.sent == [ENV.rcpt_tos], "delivered once: finished, not resent, on retry"
        assert len(calls) == 2 and store.messages == 0


async def test_a_crashed_probe_gives_the_half_open_slot_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = Relay()
    async with running(tmp_path, relay, monkeypatch) as (dispatcher, store, registry):
        breaker = registry["stand-in"].breaker
        ticket, _ = breaker.begin(0.0)
        breaker.record_failure(0.0, "test", ticket)  # threshold 1: open for ~0.05 s
        assert breaker.state is BreakerState.OPEN
        relay.crashes = 1  # the probe crashes
        meta = await store.store(ENV, BODY)
        dispatcher.enqueue(meta, BODY)
        await wait_until(lambda: dispatcher.completed == 1)
        # Had the crashed probe kept its slot, the breaker would wait for it for ever.
        assert relay.sent == [ENV.rcpt_tos]
        assert breaker.closed
