"""Delivery workers: take due jobs, pick an upstream, send, settle each recipient.

Decide synchronously, act asynchronously (STYLE §5): `_dispatch` decides where
a due job goes without awaiting; `_attempt` does the I/O and then `_settle`
applies the per-recipient verdict:
- all recipients settled -> bounce the failed ones (RFC 3464 DSN, never to <>),
  then remove the message from the spool (invariant 2);
- some deferred -> record settled recipients durably (invariant 3), then retry
  at once on an upstream that has not deferred it this round; when every
  eligible upstream has, back off (retry.py) and start a new round;
- no eligible upstream at all -> park until a breaker lets traffic through.
Concurrency is bounded by a semaphore (sum of upstream connection limits); a reload
resizes it (`reconfigure`).
Fresh bodies (with their envelopes) are kept in memory up to a byte budget;
everything else is read back from the spool, envelope and body in one read, when
its attempt starts, so the queue in memory is an index, never the bodies nor the
envelopes. A job goes cold (both dropped) whenever it stops waiting for an
upstream right away: parked, backing off, held.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Coroutine, Iterator
from typing import Any

from smtpbalancer.clock import Clock
from smtpbalancer.delivery import dsn
from smtpbalancer.delivery.outcome import Fate, Verdict, classify, merge, not_tried
from smtpbalancer.delivery.retry import RetryPolicy
from smtpbalancer.delivery.scheduler import NO_AVOID, Job, Scheduler
from smtpbalancer.envelope import Envelope
from smtpbalancer.errors import SpoolCorrupt, SpoolError
from smtpbalancer.events.event import BOUNCED, DEFERRED, DELIVERED, EXPIRED, DeliveryEvent
from smtpbalancer.events.log import EventLog
from smtpbalancer.metrics import MESSAGES_BOUNCED
from smtpbalancer.replies import SendResult, Signal
from smtpbalancer.spool.record import NO_PROGRESS, Failure, MessageMeta, Progress
from smtpbalancer.spool.store import SpoolStore
from smtpbalancer.tasks import cancel_and_wait, spawn
from smtpbalancer.upstream.registry import Pick, Registry, Upstream
from smtpbalancer.upstream.selection import Outcome

log = logging.getLogger(__name__)

HOT_BODY_BUDGET = 64 * 1024 * 1024
# Jobs taken in a row before `run` lets the loop turn. Taking a job suspends only when
# every slot is busy; a backlog whose jobs all park (every upstream down) or finish at
# once (a restart's recovered queue, a burst of due retries) would otherwise hold the
# loop, and the SMTP front end with it, until the whole backlog was gone through.
JOBS_PER_TURN = 64
EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired


class _Slots:
    """The concurrency bound: a count of free delivery slots that `run` takes one by one.

    asyncio.Semaphore.acquire is a coroutine that scans its waiters on every call (and
    release a method chain): 5k instructions a message; taking a free slot here is a
    decrement, and only an exhausted count waits.
    """

    __slots__ = ("_waiters", "free")

    def __init__(self, free: int) -> None:
        self.free = free
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        return f"<_Slots free={self.free} waiting={len(self._waiters)}>"

    def take(self) -> bool:
        """Take a slot if one is free."""
        if self.free > 0:
            self.free -= 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting (first come, first served) until one is free."""
        while not self.take():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def release(self) -> None:
        self.free += 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class Dispatcher:
    def __init__(
        self,
        *,
        store: SpoolStore,
        registry: Registry,
        scheduler: Scheduler,
        policy: RetryPolicy,
        clock: Clock,
        hostname: str,
        concurrency: int,
        rng: random.Random | None = None,
        events: EventLog | None = None,
    ) -> None:
        self._store = store
        self._events = events if events is not None and events.wants_delivery else None
        self._registry = registry
        self._scheduler = scheduler
        self._policy = policy
        self._clock = clock
        self._hostname = hostname
        self._slots = _Slots(concurrency)
        self._concurrency = concurrency
        self._owed = 0  # slots to swallow on release after a reload shrank the concurrency
        self._rng = rng or random.Random()
        self._inflight: set[asyncio.Task[None]] = set()
        self._jobs: dict[str, Job] = {}  # every spooled message this instance knows, by id
        self._running: set[str] = set()  # ids with an attempt, expiry or bounce under way
        self._hot_bytes = 0
        self._opening: asyncio.TimerHandle | None = None
        self._opening_at = 0.0
        registry.on_recovery = self._unpark
        # plain counters for reports and tests
        self.attempts = 0
        self.deferrals = 0
        self.bounces = 0
        self.completed = 0

    def __repr__(self) -> str:
        return (
            f"<Dispatcher inflight={len(self._inflight)} {self._scheduler!r}"
            f" hot_bytes={self._hot_bytes} completed={self.completed}>"
        )

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def enqueue(
        self, meta: MessageMeta, body: bytes | None, progress: Progress | None = None
    ) -> None:
        """Schedule a spooled message. `body`, when given, is the copy this process just
        spooled: the front end's normalised payload or a DSN, CRLF-clean by construction,
        so it is relayed without its line ends being counted again; one read back from the
        spool (None here) is checked, since it may predate the normalisation."""
        progress = progress or NO_PROGRESS
        job = Job(meta, progress)
        self._jobs[meta.queue_id] = job
        if body is not None and self._hot_bytes + len(body) <= HOT_BODY_BUDGET:
            job.body = body
            self._hot_bytes += len(body)
        elif progress is NO_PROGRESS or progress.pending(meta.envelope.rcpt_tos):
            job.meta = None  # cold; one with nothing pending keeps it for _dispatch to finish
        self._scheduler.add(job)

    def adopt_held(self, meta: MessageMeta, progress: Progress) -> None:
        """A message recovered with an operator's hold: known, but not scheduled."""
        job = self._jobs[meta.queue_id] = Job(meta, progress, held=True)
        job.meta = None

    # --- operator actions (the admin endpoint; see queue_admin) -------------------

    @property
    def held(self) -> int:
        return sum(1 for job in self._jobs.values() if job.held)

    async def hold(self, queue_id: str) -> str:
        """Stop attempting a message until released; an attempt under way finishes."""
        job = self._jobs.get(queue_id)
        if job is None:
            return "unknown"
        if not job.held:
            await self._store.hold(queue_id)  # the marker first: a hold survives a restart
            job.held = True
            if queue_id not in self._running:
                self._scheduler.discard(job)
                self._drop_hot(job)
        return "held"

    async def release(self, queue_id: str) -> str:
        job = self._jobs.get(queue_id)
        if job is None:
            return "unknown"
        if job.held:
            await self._store.release(queue_id)
            job.held = False
            if queue_id not in self._running:
                self._scheduler.add(job)
        return "released"

    async def delete(self, queue_id: str) -> str:
        """Drop a message without a bounce (an operator's decision; logged by the caller)."""
        job = self._jobs.get(queue_id)
        if job is None:
            return "unknown"
        if queue_id in self._running:
            return "busy"  # an upstream may be taking it right now: try again in a moment
        self._scheduler.discard(job)
        del self._jobs[queue_id]
        try:
            await self._store.delete(queue_id)
        except SpoolError:
            self._jobs[queue_id] = job
            if not job.held:
                self._scheduler.add(job)
            raise
        self._drop_hot(job)
        return "deleted"

    def retry(self, queue_id: str | None) -> dict[str, str]:
        """Attempt now, skipping the backoff (one id, or every message when None)."""
        if queue_id is not None and queue_id not in self._jobs:
            return {queue_id: "unknown"}
        chosen = list(self._jobs.values()) if queue_id is None else [self._jobs[queue_id]]
        results: dict[str, str] = {}
        for job in chosen:
            if job.held:
                results[job.queue_id] = "held"
            elif job.queue_id in self._running:
                results[job.queue_id] = "busy"
            else:
                job.avoid = NO_AVOID
                self._scheduler.add(job)
                results[job.queue_id] = "scheduled"
        return results

    async def run(self) -> None:
        taken = 0
        while True:
            taken += 1
            if taken % JOBS_PER_TURN == 0:
                await asyncio.sleep(0)  # let the loop turn: see JOBS_PER_TURN
            if not self._slots.take():
                await self._slots.acquire()
            job = self._scheduler.due()  # without a coroutine while jobs are due now
            if job is None:
                try:
                    job = await self._scheduler.next()
                except BaseException:
                    self._release_slot()
                    raise
            if job.held:  # held while it waited: it waits for a release now
                self._drop_hot(job)
                self._release_slot()
                continue
            # Every upstream that could take it is out of rate tokens: hold this job (and
            # the loop) until the first token, rather than re-queueing everything per token.
            while (wait_s := self._dispatch(job)) is not None:
                try:
                    await self._clock.sleep(wait_s)
                except BaseException:
                    self._release_slot()
                    raise

    def reconfigure(self, *, concurrency: int, policy: RetryPolicy, hostname: str) -> None:
        """A reload: new retry policy and DSN hostname for what comes next; resize the slots.

        Growing releases the extra slots at once; shrinking swallows releases until the
        in-flight work fits (nothing running is interrupted).
        """
        self._policy = policy
        self._hostname = hostname
        delta, self._concurrency = concurrency - self._concurrency, concurrency
        while delta > 0 and self._owed > 0:
            delta, self._owed = delta - 1, self._owed - 1
        for _ in range(max(0, delta)):
            self._slots.release()
        self._owed += max(0, -delta)

    def _release_slot(self) -> None:
        if self._owed > 0:
            self._owed -= 1
        else:
            self._slots.release()

    async def finish(self, timeout_s: float) -> None:
        """Let in-flight deliveries finish within timeout_s; cancel the rest (they stay spooled)."""
        if self._opening is not None:
            self._opening.cancel()
        pending = set(self._inflight)
        if pending:
            log.info("delivery.finishing inflight=%d timeout=%.1fs", len(pending), timeout_s)
            _, still = await asyncio.wait(pending, timeout=timeout_s)
            if still:
                log.warning("delivery.abandoned inflight=%d action=stay-spooled", len(still))
                await cancel_and_wait(list(still))

    # --- decisions (synchronous) ---------------------------------------------

    def _dispatch(self, job: Job) -> float | None:
        """Send the job on its way; or return how long to wait for a rate token."""
        meta = job.meta  # a cold job (None) has recipients pending: see enqueue
        progress = job.progress
        if (
            meta is not None
            and (progress.delivered or progress.failed)  # else all pending, as usual
            and not progress.pending(meta.envelope.rcpt_tos)
        ):
            self._start(job, self._guarded(job, self._finish(job, meta, job.body)))
            return None
        if self._policy.expired(self._clock.wall() - job.received_wall):
            self._start(job, self._guarded(job, self._expire(job)))
            return None
        now = self._clock.monotonic()
        choice = self._registry.choose(now, job.avoid, job.pool)
        if isinstance(choice, Pick):
            self._start(job, self._attempt(job, choice))
            return None
        if choice.outcome is Outcome.WAIT:
            return max(choice.wait_until - now, 0.001)
        self._release_slot()
        self._drop_hot(job)
        if choice.outcome is Outcome.ALL_AVOIDED:
            self._next_round(job, now)  # every eligible upstream deferred it this round
        else:
            self._scheduler.park(job)
            self._arm_opening_timer(now)  # the instant nothing was eligible: see there
        return None

    def _start(self, job: Job, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` (guarded: it releases the job's slot and running mark) as a task."""
        self._running.add(job.queue_id)
        task = spawn(work, name=f"deliver:{job.queue_id}")
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _next_round(self, job: Job, now: float) -> None:
        job.rounds += 1
        delay = self._policy.backoff(job.rounds, self._rng.random())
        log.info(
            "delivery.retry_scheduled queue_id=%s round=%d retry_in=%.1fs tried=%s",
            job.queue_id,
            job.rounds,
            delay,
            ",".join(sorted(job.avoid)),
        )
        job.avoid = NO_AVOID
        self._scheduler.add(job, now + delay)

    def _arm_opening_timer(self, now: float) -> None:
        """Unpark at the next opening after `now`.

        A job parked by `_dispatch` passes the `now` its choice was made at, not a fresh
        reading: a breaker that was still open then has its opening after that `now`, so
        it gets a timer even if the open period ends while the job is being parked. (A
        timer may fire a little early, e.g. uvloop's whole milliseconds; with a fresh
        reading past the opening, next_opening left it out and the lot stayed parked.)
        """
        at = self._registry.next_opening(now)
        if at is None:
            return  # a probe is in flight; its outcome unparks or re-arms
        if self._opening is not None and self._opening_at <= at:
            return
        if self._opening is not None:
            self._opening.cancel()
        delay = max(0.0, at - self._clock.monotonic())
        self._opening_at = at
        self._opening = asyncio.get_running_loop().call_later(delay, self._unpark)

    def _unpark(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
        if self._scheduler.parked:
            log.info("delivery.unpark jobs=%d", self._scheduler.parked)
            self._scheduler.unpark_all()

    def _drop_hot(self, job: Job) -> None:
        """Make a job cold: its body and envelope are read back when it next runs."""
        if job.body is not None:
            self._hot_bytes -= len(job.body)
            job.body = None
        if job.meta is not None and job.progress.pending(job.meta.envelope.rcpt_tos):
            job.meta = None

    # --- actions (asynchronous) ------------------------------------------------

    async def _guarded(self, job: Job, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._retry_later(job, exc)
        finally:
            self._running.discard(job.queue_id)
            self._release_slot()

    def _retry_later(self, job: Job, exc: Exception) -> None:
        """An attempt, expiry or bounce raised: the message stays spooled, retried later."""
        if isinstance(exc, SpoolError):  # e.g. the DSN could not be spooled
            log.error("delivery.spool_error queue_id=%s error=%s", job.queue_id, exc)
        else:  # never lose a message to a bug
            log.error("delivery.crashed queue_id=%s", job.queue_id, exc_info=exc)
        self._drop_hot(job)
        self._scheduler.add(job, self._clock.monotonic() + self._policy.initial_s)

    async def _load(self, job: Job) -> tuple[MessageMeta, bytes] | None:
        """The job's envelope and body: in memory while hot, else read from the spool."""
        if job.body is not None and job.meta is not None:
            return job.meta, job.body
        try:
            return await self._store.load(job.queue_id)
        except SpoolCorrupt as exc:
            self._jobs.pop(job.queue_id, None)
            await self._store.quarantine_id(job.queue_id, exc.why)
            return None
        except FileNotFoundError:
            # Removed behind our back (an operator): nothing left to deliver or retry.
            log.error("spool.missing queue_id=%s action=forget", job.queue_id)
            self._jobs.pop(job.queue_id, None)
            self._store.forget(job.queue_id)
            return None

    async def _attempt(self, job: Job, pick: Pick) -> None:
        """Relay one message to `pick`'s upstream, guarded like `_guarded`.

        One coroutine for the whole common case (hot job, one transaction, every
        recipient accepted): a task resumes every frame of its await chain each time
        the upstream answers, so every layer here costs once per round trip.
        """
        reported = False  # once True, the breaker heard this attempt's verdict
        try:
            meta, body = job.meta, job.body
            hot = meta is not None and body is not None  # CRLF-clean: see `enqueue`
            if meta is None or body is None:
                loaded = await self._load(job)
                if loaded is None:
                    return
                meta, body = loaded
            upstream = pick.upstream
            env = meta.envelope
            pending = job.progress.pending(env.rcpt_tos)
            self.attempts += 1
            started = self._clock.monotonic()
            if not 0 < len(pending) <= upstream.config.max_recipients_per_message:
                verdict = await self._send_chunks(upstream, env, pending, body, hot)
            else:
                result = await upstream.send(
                    env.mail_from,
                    pending,
                    body,
                    smtputf8=env.smtputf8,
                    body_8bit=env.body_8bit,
                    crlf_clean=hot,
                )
                if (
                    self._events is None
                    and type(result) is SendResult
                    and not result.refused
                    and result.final.ok
                ):
                    # What classify would say: every recipient DELIVERED, SUCCESS.
                    now = self._clock.monotonic()
                    upstream.metrics.answered(now - started)
                    self._registry.record_success(pick, now)
                    reported = True
                    self._settle_delivered(job, upstream, result.queue_id, pending)
                    if job.progress.failed:  # earlier attempts failed some: bounce them
                        await self._finish(job, meta, body)
                    else:
                        self._complete(job, meta)
                    return
                verdict = classify(result, pending)
            upstream.metrics.attempted(
                self._clock.monotonic() - started, answered=verdict.signal is Signal.SUCCESS
            )
            self._registry.record(pick, verdict.signal, verdict.reason)
            if verdict.signal is not Signal.SUCCESS and self._scheduler.parked:
                self._arm_opening_timer(self._clock.monotonic())
            await self._settle(job, upstream, verdict, meta, body)
            reported = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._retry_later(job, exc)
        finally:
            if not reported:  # a half-open breaker must not wait forever for this probe
                self._registry.abandon(pick)
            self._running.discard(job.queue_id)
            self._release_slot()

    async def _send_chunks(
        self,
        upstream: Upstream,
        env: Envelope,
        pending: tuple[str, ...],
        body: bytes,
        crlf_clean: bool,
    ) -> Verdict:
        """RFC 5321 §4.5.3.1.8: a relay may cap recipients per transaction; split, and
        track every recipient. After a broken session the remaining chunks wait."""
        verdicts: list[Verdict] = []
        limit = upstream.config.max_recipients_per_message
        for first in range(0, len(pending), limit):
            chunk = pending[first : first + limit]
            if verdicts and verdicts[-1].signal is not Signal.SUCCESS:
                verdicts.append(not_tried(chunk))
                continue
            result = await upstream.send(
                env.mail_from,
                chunk,
                body,
                smtputf8=env.smtputf8,
                body_8bit=env.body_8bit,
                crlf_clean=crlf_clean,
            )
            verdicts.append(classify(result, chunk))
        return verdicts[0] if len(verdicts) == 1 else merge(verdicts)

    def _settle_delivered(
        self, job: Job, upstream: Upstream, upstream_queue_id: str, rcpts: tuple[str, ...]
    ) -> None:
        """`_settle`'s bookkeeping for an attempt that delivered every recipient it tried
        (no events configured); the caller finishes the message."""
        upstream.metrics.delivered.inc()
        log.info(
            "delivery.delivered queue_id=%s upstream=%s rcpts=%d upstream_queue_id=%s",
            job.queue_id,
            upstream.name,
            len(rcpts),
            upstream_queue_id,
        )
        old = job.progress
        delivered = old.delivered | frozenset(rcpts) if old.delivered else frozenset(rcpts)
        job.progress = Progress(delivered, old.failed, old.attempts + 1)

    async def _settle(
        self, job: Job, upstream: Upstream, verdict: Verdict, meta: MessageMeta, body: bytes
    ) -> None:
        delivered: list[str] = []
        failed: list[str] = []
        deferred: list[str] = []
        by_fate = {Fate.DELIVERED: delivered, Fate.FAIL: failed, Fate.DEFER: deferred}
        for rcpt, fate in verdict.fates.items():
            by_fate[fate].append(rcpt)
        wall = self._clock.wall()
        if delivered:
            upstream.metrics.delivered.inc()
            log.info(
                "delivery.delivered queue_id=%s upstream=%s rcpts=%d upstream_queue_id=%s",
                job.queue_id,
                upstream.name,
                len(delivered),
                verdict.upstream_queue_id,
            )
        old = job.progress
        if self._events is not None:  # durable before the outcome is: never a missing event
            await self._events.emit(_outcome_events(job, meta, upstream, verdict, wall))
        all_failed = old.failed
        if failed:
            all_failed = {**old.failed}
            for r in failed:
                reply = verdict.replies[r]
                all_failed[r] = Failure(
                    reply.effective_status, reply.line, upstream.config.host, wall
                )
        job.progress = Progress(
            delivered=old.delivered | frozenset(delivered) if delivered else old.delivered,
            failed=all_failed,
            attempts=old.attempts + 1,
        )
        if failed:
            log.info(
                "delivery.failed queue_id=%s upstream=%s rcpts=%d reply=%r",
                job.queue_id,
                upstream.name,
                len(failed),
                verdict.replies[failed[0]].line,
            )
        if not deferred:
            await self._finish(job, meta, body)
            return
        self.deferrals += 1
        upstream.metrics.deferred.inc()
        if job.last_reply is None:
            job.last_reply = {}
        for rcpt in deferred:
            job.last_reply[rcpt] = verdict.replies[rcpt]
        log.info(
            "delivery.deferred queue_id=%s upstream=%s rcpts=%d reply=%r",
            job.queue_id,
            upstream.name,
            len(deferred),
            verdict.replies[deferred[0]].line,
        )
        if delivered or failed:
            try:
                await self._store.save_progress(job.queue_id, job.progress)
            except SpoolError as exc:  # worst case after a crash: a duplicate, never a loss
                log.error("spool.progress_failed queue_id=%s error=%s", job.queue_id, exc)
        job.avoid = job.avoid | {upstream.name}
        self._scheduler.add(job)  # _dispatch sends it elsewhere, or starts a new round

    async def _expire(self, job: Job) -> None:
        loaded = await self._load(job)
        if loaded is None:
            return
        meta, body = loaded
        wall = self._clock.wall()
        pending = job.progress.pending(meta.envelope.rcpt_tos)
        failures = dict(job.progress.failed)
        last_reply = job.last_reply or {}
        for rcpt in pending:
            last = last_reply.get(rcpt)
            failures[rcpt] = Failure(EXPIRED_STATUS, last.line if last else "", "", wall)
        log.warning("delivery.expired queue_id=%s rcpts=%d", job.queue_id, len(pending))
        if self._events is not None:
            await self._events.emit(
                _event(job, meta, r, EXPIRED, "", failures[r].diagnostic, EXPIRED_STATUS, "", wall)
                for r in pending
            )
        job.progress = Progress(job.progress.delivered, failures, job.progress.attempts)
        await self._finish(job, meta, body)

    async def _finish(self, job: Job, meta: MessageMeta, body: bytes | None) -> None:
        failed = job.progress.failed
        if failed and meta.envelope.null_sender:
            # RFC 5321 §6.1: never bounce a bounce.
            log.info("delivery.bounce_dropped queue_id=%s rcpts=%d", job.queue_id, len(failed))
        elif failed:
            if body is None:
                loaded = await self._load(job)
                if loaded is None:
                    return
                body = loaded[1]
            await self._bounce(job, meta, body)
        self._complete(job, meta)

    def _complete(self, job: Job, meta: MessageMeta) -> None:
        """Off the spool (its done mark goes out with this loop turn's) and forgotten."""
        self._store.remove_soon(meta)
        self._jobs.pop(meta.queue_id, None)
        if job.body is not None:  # _drop_hot's part that matters for a finished job
            self._hot_bytes -= len(job.body)
            job.body = None
        self.completed += 1

    async def _bounce(self, job: Job, meta: MessageMeta, body: bytes) -> None:
        report = dsn.build_dsn(
            reporting_mta=self._hostname,
            queue_id=meta.queue_id,
            original_sender=meta.envelope.mail_from,
            arrival_wall=meta.received_wall,
            now_wall=self._clock.wall(),
            failed=[
                dsn.FailedRecipient(
                    address=rcpt,
                    status=f.status,
                    diagnostic=f.diagnostic,
                    remote_mta=f.remote_mta,
                    last_attempt_wall=f.at_wall or None,
                )
                for rcpt, f in job.progress.failed.items()
            ],
            original_headers=dsn.original_headers(body),
            message_id=f"{meta.queue_id}.dsn@{self._hostname}",
        )
        bounce_env = Envelope(
            "", (meta.envelope.mail_from,), smtputf8=meta.envelope.smtputf8, pool=meta.envelope.pool
        )
        # Raises SpoolError: then the original stays spooled and is finished again later.
        bounce = await self._store.store(bounce_env, report, client="localhost")
        self.bounces += 1
        MESSAGES_BOUNCED.inc()
        log.info(
            "delivery.bounced queue_id=%s rcpts=%d dsn_queue_id=%s",
            meta.queue_id,
            len(job.progress.failed),
            bounce.queue_id,
        )
        self.enqueue(bounce, report)


_FATE_STATUS = {Fate.DELIVERED: DELIVERED, Fate.FAIL: BOUNCED, Fate.DEFER: DEFERRED}


def _outcome_events(
    job: Job, meta: MessageMeta, upstream: Upstream, verdict: Verdict, wall: float
) -> Iterator[DeliveryEvent]:
    """One event per recipient this attempt settled or deferred (not-tried ones wait)."""
    for fate, status in _FATE_STATUS.items():
        for rcpt in verdict.having(fate):
            reply = verdict.replies[rcpt]
            qid = verdict.upstream_queue_id if fate is Fate.DELIVERED else ""
            yield _event(
                job,
                meta,
                rcpt,
                status,
                upstream.name,
                reply.line,
                reply.effective_status,
                qid,
                wall,
            )


def _event(
    job: Job,
    meta: MessageMeta,
    rcpt: str,
    status: str,
    upstream: str,
    reply: str,
    enhanced: str,
    upstream_queue_id: str,
    wall: float,
) -> DeliveryEvent:
    env = meta.envelope
    return DeliveryEvent(
        status=status,
        queue_id=job.queue_id,
        message_id=env.message_id,
        sender=env.mail_from,
        recipient=rcpt,
        pool=env.pool,
        upstream=upstream,
        smtp_reply=reply,
        enhanced_status=enhanced,
        upstream_queue_id=upstream_queue_id,
        received_at=meta.received_wall,
        at=wall,
        attempt=job.progress.attempts + 1,
        headers=dict(env.tags),
    )
