"""The background task: wake on size or time, send, retry, split, spill, account.

One flusher per client. Its loop sleeps until the batcher has a full batch, the oldest queued
signal is ``flush_interval`` old, ``flush()`` asks, or the client closes; it then cuts batches
and hands each to a delivery task, at most ``max_concurrent_requests`` at once.

A delivery ends every signal of its batch in exactly one bucket (sent, spooled, dropped with a
reason). The policy by answer:

* 2xx: sent.
* 408, 429, 5xx (not 501/505), connection errors, timeouts: retried with backoff until the
  retry deadline (``_retry.py``); 429 and 503 also pause every other request (``Retry-After``).
* 413: split in halves, each sent on; a lone signal still too large is dropped (``oversize``).
* 400/422: bisected so one bad signal does not sink the rest; the bad ones are dropped
  (``rejected``) with the server's message in the log.
* 401/403/404: the app ID or namespace is wrong; 3xx: the ``base_url`` is (a redirect is never
  followed). One ERROR is logged, the batch is kept (spool or memory) and the endpoint is
  probed every ``auth_probe_interval`` instead of hammered.

Nothing here raises into the caller: unexpected exceptions are logged with a traceback and the
loop keeps serving; ``flush()`` waiters are woken whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import attrs

from ._batcher import Batch, Batcher
from ._config import ClientConfig
from ._retry import retry_call
from ._signal import Signal, encode_signal
from ._spool import Destination, Spool, SpoolRecord, append_pending_blocking, open_spool
from ._stats import Accounting, DropReason, FlushResult, decode_bodies
from ._transport import Transport
from .exceptions import (
    AuthenticationError,
    CertificateError,
    DeliveryError,
    PayloadTooLargeError,
    RedirectError,
    RejectedError,
    RetryableStatusError,
    SpoolError,
)

__all__ = ["Flusher", "describe_wait"]

log = logging.getLogger("telemetrydeck_async")


def describe_wait(seconds: float) -> str:
    """A wait for people: ``"40 ms"`` below a second (never ``"0.0 s"``), else ``"2.5 s"``."""
    if seconds < 0.0005:
        return "no wait"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


# Statuses that mean "the server as a whole is overloaded": every request waits, not just one.
_PAUSING_STATUSES = frozenset({429, 503})


class _Interrupted(Exception):
    """Raised inside a delivery when the client is closing and its time is up."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Fetch an abandoned request's outcome so asyncio does not warn it was never retrieved."""
    if not future.cancelled():
        future.exception()


#: ``seq`` of batches read back from the spool: after every flush() target, never waited for.
_RECOVERED_SEQ = 2**62
#: Encoded signals that may wait in memory for the spool writer (beside the queue itself).
_OVERFLOW_BUFFER = 10_000
#: Overflowing signals written to the spool per transaction.
_SPILL_CHUNK = 1_000
#: A spool owner renews its lease this often while idle (the spool's lease is 30 s).
_HEARTBEAT_INTERVAL = 10.0


@attrs.define(eq=False)
class Flusher:
    """Owns the background task, the in-flight deliveries and the delivery policy."""

    config: ClientConfig
    batcher: Batcher
    transport: Transport
    accounting: Accounting
    #: The open spool once ``spool_dir`` is configured and the spool has opened; else None.
    spool: Spool | None = None
    _task: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    # Each delivery task with the sub-batches it has not accounted yet (a 413 or 400 splits a
    # batch): in-flight counts are read from here, so a signal is never counted twice.
    _deliveries: dict[asyncio.Task[None], list[Batch]] = attrs.field(factory=dict, init=False)
    _slots: asyncio.Semaphore = attrs.field(init=False)
    _progress: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _interrupt: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _force_until: int = attrs.field(default=0, init=False)
    _pause_until: float = attrs.field(default=0.0, init=False)
    _auth_failed_at: float | None = attrs.field(default=None, init=False)
    _parked: deque[Batch] = attrs.field(factory=deque, init=False)
    _failing: bool = attrs.field(default=False, init=False)
    # Spool acks and overflow spills run beside deliveries; close() waits for them.
    _background: set[asyncio.Future[Any]] = attrs.field(factory=set, init=False)
    _spool_opening: asyncio.Task[Spool | None] | None = attrs.field(default=None, init=False)
    _recovery: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    # Signals that overflowed the queue, encoded, waiting for one background spill.
    _overflow: deque[tuple[bytes, float]] = attrs.field(factory=deque, init=False)
    # The overflow signals the spool writer is storing right now (still in memory, pending).
    _overflow_chunk: list[tuple[bytes, float]] = attrs.field(factory=list, init=False)
    _overflow_task: asyncio.Task[None] | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.config.max_concurrent_requests)

    # ----------------------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        """True while the background task is alive."""
        return self._task is not None and not self._task.done()

    @property
    def parked(self) -> int:
        """Signals held in memory while the endpoint refuses the app ID or namespace."""
        return sum(len(b) for b in self._parked)

    @property
    def in_flight(self) -> int:
        """Signals of this process in deliveries not yet accounted (backoff waits included)."""
        return sum(len(b) for todo in self._deliveries.values() for b in todo if not b.recovered)

    @property
    def queue_depth(self) -> int:
        """Signals waiting in memory: the queue, and overflow waiting for the spool writer."""
        return len(self.batcher) + len(self._overflow) + len(self._overflow_chunk)

    @property
    def pending(self) -> int:
        """Signals of this process not yet sent, spooled or dropped."""
        return self.queue_depth + self.in_flight + self.parked

    @property
    def healthy(self) -> bool:
        """True while requests succeed: no failure since the last 2xx, no pause, no refusal."""
        return (
            self.running
            and not self._failing
            and self._auth_failed_at is None
            and self._pause_until <= time.monotonic()
        )

    @property
    def endpoint_refusing(self) -> bool:
        """True while the endpoint answers 401/403/404 (until a probe succeeds)."""
        return self._auth_failed_at is not None

    def start(self) -> None:
        """Start the background task in the running loop (idempotent)."""
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name="telemetrydeck-flusher")
            self._task.add_done_callback(self._on_task_done)
            if self.config.spool_dir is not None:
                self._spool_opening = loop.create_task(
                    self._open_spool(self.config.spool_dir), name="telemetrydeck-spool-open"
                )
                self._recovery = loop.create_task(
                    self._recover_forever(), name="telemetrydeck-spool-recovery"
                )

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        # The loop below never returns on its own before stop; if it died anyway, say so loudly
        # and wake every flush() waiter instead of leaving it hanging.
        if not task.cancelled() and task.exception() is not None:
            log.error("the flusher task died", exc_info=task.exception())
        self._progress.set()

    # ----------------------------------------------------------------------------- main loop

    async def _run(self) -> None:
        while True:
            try:
                if self._stopping and not self.batcher and not self._parked:
                    return
                await self._wait_for_work()
                await self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving: one bad iteration must not stop delivery
                log.warning("unexpected error in the flusher; carrying on", exc_info=True)
                self.accounting.record_error(exc)
                await asyncio.sleep(0.1)

    def _sendable(self) -> bool:
        if self._parked:
            return self._probe_due()
        if not self.batcher:
            return False
        if self.endpoint_refusing:
            return self._probe_due()
        return (
            self._stopping
            or self.batcher.taken_total < self._force_until
            or self.batcher.full_batch_ready()
            or self.batcher.oldest_age() >= self.config.flush_interval
        )

    def _probe_due(self) -> bool:
        if self._auth_failed_at is None:
            return True
        return time.monotonic() - self._auth_failed_at >= self.config.retry.auth_probe_interval

    async def _wait_for_work(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = self.batcher.wakeup
        while not self._sendable():
            if self._stopping and not self.batcher and not self._parked:
                return
            wakeup.clear()
            delay: float | None = None
            if self.endpoint_refusing and self._auth_failed_at is not None:
                delay = self.config.retry.auth_probe_interval - (
                    time.monotonic() - self._auth_failed_at
                )
            elif self.batcher:
                delay = self.config.flush_interval - self.batcher.oldest_age()
            timer = loop.call_later(max(delay, 0.0), wakeup.set) if delay is not None else None
            try:
                await wakeup.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    async def _dispatch(self) -> None:
        while self._sendable():
            await self._slots.acquire()
            # The wait for a slot may have outlasted the reason to send (a refusal, a flush
            # already served): look again before cutting a batch.
            batch = self._next_batch() if self._sendable() else None
            if batch is None:
                self._slots.release()
                return
            self._launch(batch)
            if self.endpoint_refusing:
                return  # one probe at a time
            # One batch cut and encoded per turn of the loop: the caller's coroutines run in
            # between, so a burst never holds the loop for several batches' encoding.
            await asyncio.sleep(0)

    def _launch(self, batch: Batch) -> None:
        """Start the delivery of ``batch``; the caller holds a slot, released when it ends."""
        todo = [batch]
        task = asyncio.get_running_loop().create_task(self._deliver(todo))
        self._deliveries[task] = todo
        task.add_done_callback(self._delivery_done)

    def _next_batch(self) -> Batch | None:
        if self._parked:
            return self._parked.popleft()
        return self.batcher.take()

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        todo = self._deliveries.pop(task, None)
        if todo:
            # A task cancelled before its first step never runs its own except clause (the
            # loop's teardown at the end of asyncio.run() does that): its batch is handed back
            # here, so it is never in no bucket.
            for rest in todo:
                self._abandon(rest)
            todo.clear()
        self._slots.release()
        self._progress.set()
        self.batcher.wakeup.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("a delivery task failed unexpectedly", exc_info=task.exception())

    # ----------------------------------------------------------------------------- delivery

    async def _deliver(self, todo: list[Batch]) -> None:
        deadline = time.monotonic() + self.config.retry.deadline
        # ``todo``: sub-batches not yet accounted, the next one last. A split replaces a batch
        # by its halves, so a cancellation accounts exactly what is left, never a sent half
        # again. A batch is accounted and popped with no await in between: a reader of
        # in_flight never sees it twice.
        try:
            while todo:
                halves = await self._deliver_once(todo[-1], deadline)
                todo.pop()
                if halves is not None:
                    todo.extend(reversed(halves))
        except asyncio.CancelledError:
            for rest in todo:
                self._abandon(rest)
            todo.clear()
            raise

    def _abandon(self, batch: Batch) -> None:
        """A delivery was cancelled: what is on disk stays there, the rest is parked.

        Parked, it is still pending: a close() spools or drops it next, and when the loop
        is torn down without a close (asyncio.run() ending without aclose()) the exit hook
        (_lifecycle) spools it or reports it lost.
        """
        written = batch.written_ids()
        if written and self.spool is not None:
            self._spool_later(self.spool.release(written))
            if not batch.recovered:
                self.accounting.record_spooled(len(written))
        rest = batch.not_written()
        if not batch.recovered and rest.bodies:
            self._parked.appendleft(rest)

    async def _deliver_once(self, batch: Batch, deadline: float) -> tuple[Batch, Batch] | None:
        """Send ``batch`` with retries and account it; or return its halves to send instead."""
        body = batch.payload()
        try:
            await retry_call(
                self.config.retry,
                lambda: self._attempt(body),
                sleep=self._sleep,
                deadline=max(deadline - time.monotonic(), 0.001),
                on_retry=self._on_retry,
            )
        except PayloadTooLargeError as exc:
            self.accounting.record_error(exc)
            if len(batch) > 1:
                return batch.split()
            self._drop(batch, "oversize", str(exc))
        except RejectedError as exc:
            if len(batch) > 1:
                return batch.split()  # bisect: one bad signal must not sink the others
            self.accounting.record_error(exc)
            self._drop(batch, "rejected", exc.body[:200])
        except (AuthenticationError, CertificateError) as exc:
            self.accounting.record_error(exc)
            self._on_auth_failure(exc)
            await self._keep(batch)
        except _Interrupted:
            await self._spill_or_drop(batch, "shutdown")
        except DeliveryError as exc:
            self.accounting.record_error(exc)
            if exc.retryable:
                await self._spill_or_drop(batch, "retries_exhausted", str(exc))
            else:
                self._drop(batch, "permanent_error", str(exc))
        else:
            self._on_sent(batch)
        return None

    async def _attempt(self, body: bytes) -> None:
        await self._wait_out_pause()
        if self._interrupt.is_set():
            raise _Interrupted
        # Race the request against close(): once the close budget is spent, an unanswered
        # request is abandoned and its batch spooled (or dropped) instead of awaited.
        send = asyncio.ensure_future(self.transport.send(body))
        interrupt = asyncio.ensure_future(self._interrupt.wait())
        try:
            done, _ = await asyncio.wait((send, interrupt), return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupt.cancel()
            if not send.done():
                send.cancel()
                send.add_done_callback(_retrieve)
        if send not in done:
            raise _Interrupted
        try:
            send.result()
        except RetryableStatusError as exc:
            if exc.status in _PAUSING_STATUSES:
                self._pause(exc)
            raise

    def _pause(self, exc: RetryableStatusError) -> None:
        policy = self.config.retry
        wait = policy.retry_after_wait(exc.retry_after) or policy.initial_backoff
        until = time.monotonic() + wait
        if until > self._pause_until:
            self._pause_until = until
            self.accounting.warnings.log(
                logging.WARNING,
                "pause",
                "ingest endpoint answered %d; pausing all requests for %s",
                exc.status,
                describe_wait(wait),
            )

    async def _wait_out_pause(self) -> None:
        while (left := self._pause_until - time.monotonic()) > 0:
            await self._sleep(left)

    async def _sleep(self, seconds: float) -> None:
        """Sleep that a closing client cuts short (by raising ``_Interrupted``)."""
        if self._interrupt.is_set():
            raise _Interrupted
        try:
            await asyncio.wait_for(self._interrupt.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            return
        raise _Interrupted

    def _on_retry(self, exc: BaseException, wait: float) -> None:
        self.accounting.record_retry()
        self._failing = True
        self.accounting.record_error(exc)
        self.accounting.warnings.log(
            logging.WARNING,
            f"retry:{type(exc).__name__}",
            "request to the ingest endpoint failed (%s); retrying in %s",
            exc,
            describe_wait(wait),
        )
        # Every retry at DEBUG (the WARNING above is rate-limited); `event` lets a handler,
        # such as the demo's, pick these out without parsing the text.
        log.debug(
            "request failed (%s); retrying in %s",
            exc,
            describe_wait(wait),
            extra={"telemetrydeck_event": "retry", "telemetrydeck_wait": wait},
        )

    def _on_auth_failure(self, exc: AuthenticationError | CertificateError) -> None:
        if self._auth_failed_at is not None:
            pass
        elif isinstance(exc, CertificateError):
            log.error(
                "%s. Signals are kept and the endpoint will be probed every %g s.",
                exc,
                self.config.retry.auth_probe_interval,
            )
        elif isinstance(exc, RedirectError):
            log.error(
                "the ingest endpoint %s answered HTTP %d, a redirect to %s. Redirects are never "
                "followed (the signals would go elsewhere): check base_url (https:// rather "
                "than http://, the host, no extra path). Signals are kept and the endpoint will "
                "be probed every %g s.",
                self.transport.url,
                exc.status,
                exc.location or "(no Location header)",
                self.config.retry.auth_probe_interval,
            )
        else:
            log.error(
                "the ingest endpoint refused app ID %r (namespace %r) with HTTP %d: check the "
                "app ID and namespace in the TelemetryDeck dashboard. Signals are kept and the "
                "endpoint will be probed every %g s.",
                self.config.app_id,
                self.config.namespace,
                exc.status,
                self.config.retry.auth_probe_interval,
            )
        self._auth_failed_at = time.monotonic()

    def _on_sent(self, batch: Batch) -> None:
        self._failing = False
        if self._auth_failed_at is not None:
            log.info("the ingest endpoint accepts signals again")
            self._auth_failed_at = None
        self.accounting.record_sent(len(batch), recovered=batch.recovered)
        self._forget(batch)

    # ----------------------------------------------------------------------------- outcomes

    async def _keep(self, batch: Batch) -> None:
        """Hold a refused batch: in the spool if there is one, else parked in memory."""
        if await self._usable_spool() is not None:
            await self._spill_or_drop(batch, "retries_exhausted")
            return
        self._parked.append(batch)
        # Parked signals count against the queue's bound: memory stays flat during the outage.
        while self.parked + len(self.batcher) > self.config.max_queue_size and self._parked:
            self._drop(self._parked.popleft(), "queue_full")

    async def _spill_or_drop(self, batch: Batch, reason: DropReason, detail: str = "") -> None:
        """Put a batch that cannot be sent now in the spool; without one, drop it."""
        spool = await self._usable_spool()
        if spool is None:
            self._drop(batch, reason, detail)
            return
        written = batch.written_ids()
        if batch.recovered:
            # Already on disk and counted there: hand it back for a later attempt.
            await spool.release(written)
            return
        rest = batch.not_written()
        records = [
            SpoolRecord(at, body) for body, at in zip(rest.bodies, rest.received_at, strict=True)
        ]
        result = await spool.append(records) if records else None
        # No await from here until the caller lets go of the batch: a reader of the books
        # sees it pending or spooled, never both, never neither.
        if written:
            # Written ahead: on disk already; hand it back for a later attempt.
            self._spool_later(spool.release(written))
            self.accounting.record_spooled(len(written))
        if result is not None:
            self.accounting.record_stored(
                rest.bodies,
                len(result.ids),
                result.failed,
                # rejected: this write's own oldest that did not fit (never on disk).
                result.evicted + result.rejected,
                detail,
            )

    def _drop(self, batch: Batch, reason: DropReason, detail: str = "") -> None:
        bodies = batch.bodies
        self.accounting.record_dropped(
            reason, len(batch), lambda: decode_bodies(bodies), detail, from_spool=batch.recovered
        )
        self._forget(batch)

    def _forget(self, batch: Batch) -> None:
        """The batch reached a final state: delete whatever of it is on disk."""
        if batch.spool_ids and self.spool is not None:
            written = batch.written_ids()
            if written:
                self._spool_later(self.spool.ack(written))

    def _spool_later(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----------------------------------------------------------------------------- spool

    async def _open_spool(self, directory: str) -> Spool | None:
        config = self.config
        try:
            spool = await open_spool(
                directory,
                max_bytes=config.spool_max_bytes,
                max_age=config.spool_max_age,
                durability=config.durability,
                destination=Destination(config.endpoint_url, config.app_id),
            )
        except Exception as exc:  # never into the app: carry on memory-only
            log.exception("could not open the spool in %s; memory only", directory)
            self.accounting.record_error(exc)
            return None
        if spool.disabled:  # the spool logged why; stats.last_error says it too
            self.accounting.record_error(
                SpoolError(f"spool_dir {directory!r} cannot be used; running memory only")
            )
        self.spool = spool
        await self._read_spool_figures(spool)
        return spool

    async def spool_ready(self, timeout: float) -> None:
        """Wait (bounded) until the spool has opened, or failed to; no-op without a spool."""
        opening = self._spool_opening
        if opening is not None and not opening.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(opening), timeout)

    async def _usable_spool(self) -> Spool | None:
        """The spool once it has opened, or None (not configured, failed, disabled, closed)."""
        opening = self._spool_opening
        if opening is None:
            return None
        spool = await asyncio.shield(opening) if not opening.done() else opening.result()
        if spool is None or spool.disabled or spool.closed:
            return None
        return spool

    async def write_ahead(self, signal: Signal) -> int | None:
        """Durability "always": store ``signal`` on disk before ``signal()`` returns.

        Returns its record id, or None when the spool cannot take it (the signal then goes on
        from memory; the spool logs and counts the failure).
        """
        spool = await self._usable_spool()
        if spool is None:
            return None
        record = SpoolRecord(signal.received_at, encode_signal(signal, self.config.app_id))
        result = await spool.append([record], claimed=True)
        # Only records that were on disk before count as dropped from the spool: a record
        # that did not fit itself goes on from memory.
        own = 1 - len(result.ids) - result.failed
        self.accounting.record_dropped("spool_full", result.evicted - max(own, 0), from_spool=True)
        return result.ids[0] if result.ids else None

    async def _read_spool_figures(self, spool: Spool) -> None:
        status = await spool.status()
        if status.error is not None:
            # Unknown is not empty: a failed read must not tell ``spool drain`` (or anyone
            # watching stats) that everything was sent.
            self.accounting.record_spool_figures(None, None)
            self.accounting.record_error(SpoolError(f"could not read the spool: {status.error}"))
            return
        self.accounting.record_spool_figures(status.records, status.bytes)

    async def _recover_forever(self) -> None:
        """Send what the spool holds, oldest first, whenever the endpoint is healthy.

        Runs from start-up until close; also renews this process's lease on its records.
        """
        spool = await self._usable_spool()
        if spool is None:
            return
        interval = min(self.config.flush_interval, 5.0)
        beat = time.monotonic()
        while not self._stopping:
            try:
                if self._may_recover():
                    await self._recover_some(spool)
                if time.monotonic() - beat >= _HEARTBEAT_INTERVAL:
                    beat = time.monotonic()
                    await spool.heartbeat()
                await self._read_spool_figures(spool)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep recovering later; never into the app
                log.warning("error while sending spooled signals; will retry", exc_info=True)
                self.accounting.record_error(exc)
            await asyncio.sleep(interval)

    def _may_recover(self) -> bool:
        """Spooled signals go out while the endpoint works, or as the probe once it failed.

        After a failure, one recovered batch at a time tests the endpoint (with the usual
        backoff) once nothing else is in flight; a success resumes the full pace. While the
        endpoint refuses the configuration (401/403/404, 3xx), one recovered batch is the
        probe every ``auth_probe_interval``: with everything spooled, nothing else would ask.
        """
        refused = self._auth_failed_at is not None
        return (
            self.running
            and not self._stopping
            and (not refused or (self._probe_due() and not self._deliveries))
            and self._pause_until <= time.monotonic()
            and (not self._failing or not self._deliveries)
        )

    async def _recover_some(self, spool: Spool) -> None:
        """Claim and send spooled batches until the spool is empty or the endpoint fails."""
        config = self.config
        # Each signal costs a comma in the body, and the brackets two bytes.
        budget = config.max_batch_bytes - 2 - config.batch_size
        while self._may_recover():
            await self._slots.acquire()
            if not self._may_recover():
                self._slots.release()
                return
            claim = await spool.claim(config.batch_size, budget)
            self.accounting.record_dropped("expired", claim.expired, from_spool=True)
            if not claim.records:
                self._slots.release()
                return
            ids: list[int | None] = [record_id for record_id, _ in claim.records]
            bodies = [body for _, body in claim.records]
            self._launch(Batch(bodies, [0.0] * len(bodies), _RECOVERED_SEQ, ids, recovered=True))

    def overflow(self, signal: Signal, spool_id: int | None = None) -> None:
        """A signal did not fit in the queue: spool it in the background, or drop it."""
        if spool_id is not None and self.spool is not None:
            # Written ahead: it is on disk already; hand it to the spool for later.
            self.accounting.record_spooled(1)
            self._spool_later(self.spool.release([spool_id]))
            return
        body = encode_signal(signal, self.config.app_id)
        if self.config.spool_dir is None:
            self._drop(Batch([body], [signal.received_at], -1), "queue_full")
            return
        # One background writer for all overflowing signals, not a task per signal.
        self._overflow.append((body, signal.received_at))
        # Bounded, the chunk being written included: a burst from synchronous code can outrun
        # the disk for a moment, but memory stays capped however slow the disk is.
        if len(self._overflow) + len(self._overflow_chunk) > _OVERFLOW_BUFFER:
            old_body, old_at = self._overflow.popleft()
            self._drop(Batch([old_body], [old_at], -1), "queue_full")
        if self._overflow_task is None or self._overflow_task.done():
            self._overflow_task = asyncio.ensure_future(self._spill_overflow())
            self._background.add(self._overflow_task)
            self._overflow_task.add_done_callback(self._background.discard)

    async def wait_for_overflow_room(self, timeout: float) -> None:
        """For ``await signal()``: while the spool writer is behind, wait (bounded) for it.

        Awaiting callers then slow down to the disk's pace instead of losing signals; callers
        that cannot wait (``signal_nowait()``) drop the oldest overflow as ``queue_full``.
        """
        task = self._overflow_task
        if task is None or task.done():
            return
        if len(self._overflow) + len(self._overflow_chunk) < _OVERFLOW_BUFFER:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout)

    async def _spill_overflow(self) -> None:
        # One deque for the client's life (emptied in place, never replaced): a chunk handed
        # back below always lands where close() and the exit hook look.
        overflow = self._overflow
        while overflow:
            # A bounded chunk per write: building its records runs on the loop.
            chunk = self._overflow_chunk = [
                overflow.popleft() for _ in range(min(len(overflow), _SPILL_CHUNK))
            ]
            batch = Batch([b for b, _ in chunk], [at for _, at in chunk], -1)
            try:
                await self._spill_or_drop(batch, "queue_full")
            except asyncio.CancelledError:
                # Not written (or not known to be): back in front of the rest, where a
                # close() or the exit hook finds it.
                overflow.extendleft(reversed(chunk))
                raise
            finally:
                self._overflow_chunk = []

    # ----------------------------------------------------------------------------- flush, close

    def _flushed(self, target: int) -> bool:
        if self.endpoint_refusing:
            return True  # nothing moves until a probe succeeds: report the rest as pending
        if self.batcher.taken_total < target and self.batcher:
            return False
        return all(b.seq >= target for todo in self._deliveries.values() for b in todo)

    async def flush(self, timeout: float | None = None) -> FlushResult:
        """Send everything queued so far; return what was accounted for while waiting."""
        before = self._counts()
        target = self.batcher.put_total
        self._force_until = max(self._force_until, target)
        self.batcher.wakeup.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wait_flushed(target), timeout)
        return self._result_since(before)

    async def _wait_flushed(self, target: int) -> None:
        while not self._flushed(target):
            if not self.running and not self._deliveries:
                return  # the task has stopped and nothing is in flight: nothing will move
            self._progress.clear()
            await self._progress.wait()

    async def close(self, timeout: float) -> FlushResult:
        """Flush within ``timeout``, spool or drop what is left, stop the task and the transport.

        The close on the client's loop (``aclose()``, or the exit hook for a loop still running
        in another thread); :meth:`salvage_without_loop` is the one for a loop that is gone.
        """
        before = self._counts()
        self._stopping = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        # Keep a little of the budget to spool what could not be sent.
        grace = min(1.0, timeout * 0.2)
        if self.running:
            await self.flush(timeout=max(end - grace - loop.time(), 0.0))
        # Stop dispatching first, so no new delivery starts behind our back.
        for task in (self._task, self._recovery):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._interrupt.set()
        if self._deliveries:
            _, still = await asyncio.wait(
                list(self._deliveries), timeout=max(end - loop.time(), 0.05)
            )
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
        # Each batch stays parked (pending) until it is spooled or dropped: the books balance
        # at every await of this loop, and a close cut short leaves the rest for the exit hook.
        self._parked.extend(self.batcher.drain())
        while self._parked:
            await self._spill_or_drop(self._parked[0], "shutdown")
            self._parked.popleft()
        if self._background:
            await asyncio.wait(list(self._background), timeout=max(end - loop.time(), 0.05))
        if self._overflow:  # the disk was too slow for the close budget
            chunk = list(self._overflow)
            self._overflow.clear()
            self._drop(Batch([b for b, _ in chunk], [at for _, at in chunk], -1), "shutdown")
        # The spool may still be opening (a very short-lived client): wait, then close it, so
        # its thread never outlives the client.
        spool = None if self._spool_opening is None else await asyncio.shield(self._spool_opening)
        if spool is not None:
            if not spool.disabled and not spool.closed:
                await self._read_spool_figures(spool)
            await spool.close()
        self._progress.set()
        result = self._result_since(before)
        if result.dropped:
            log.warning(
                "client closed; %d signal(s) could not be sent or spooled: %s",
                result.dropped_total,
                ", ".join(f"{n} {reason}" for reason, n in sorted(result.dropped.items())),
            )
        await self.transport.close()
        return result

    def salvage_without_loop(self, why: str) -> FlushResult:
        """Spool, or drop with reason ``shutdown``, everything still in memory; no event loop.

        The close for a client whose loop is gone (the exit hook, or ``aclose()`` on another
        loop): no task will run again, so the batches (parked, in flight, queued, overflow
        waiting for the spool writer) are taken out of memory directly and written with a
        blocking append (no network I/O). Batches read back from the spool are left out: they
        are on disk and not in the books. Every outcome goes through the ledger, as on the
        loop. ``why`` ends the log lines (what the user should do differently).
        """
        before = self._counts()
        overflow = [*self._overflow_chunk, *self._overflow]
        batches = [
            batch
            for batch in [
                *self._parked,
                *(b for todo in self._deliveries.values() for b in todo),
                *self.batcher.drain(),
                Batch([b for b, _ in overflow], [at for _, at in overflow], -1),
            ]
            if not batch.recovered and batch.bodies
        ]
        self._parked.clear()
        self._deliveries.clear()
        self._overflow.clear()
        self._overflow_chunk = []
        # Signals already on disk (written ahead) stay there, claimed by this process; once it
        # has exited, the next process adopts them. Writing them again would send them twice.
        self.accounting.record_spooled(sum(len(b.written_ids()) for b in batches))
        in_memory = [rest for rest in (b.not_written() for b in batches) if rest.bodies]
        bodies = [body for b in in_memory for body in b.bodies]
        if bodies and self.config.spool_dir is not None:
            records = [
                SpoolRecord(received_at=at, body=body)
                for batch in in_memory
                for body, at in zip(batch.bodies, batch.received_at, strict=True)
            ]
            stored, failed, evicted = self._append_without_loop(self.config.spool_dir, records)
            self.accounting.record_stored(bodies, stored, failed, evicted, why)
        elif bodies:
            self.accounting.record_dropped(
                "shutdown", len(bodies), lambda: decode_bodies(bodies), why
            )
        result = self._result_since(before)
        if result.spooled:
            log.info("%d signal(s) written to the spool for the next run: %s", result.spooled, why)
        return result

    def _append_without_loop(
        self, directory: str, records: list[SpoolRecord]
    ) -> tuple[int, int, int]:
        """Store ``records`` pending, blocking; return (stored, failed, evicted).

        Through this process's open spool when it has one; otherwise the configured directory
        is opened just for this write, in the calling thread.
        """
        config = self.config
        try:
            if self.spool is not None:
                result = self.spool.append_sync(records)
            else:
                result = append_pending_blocking(
                    directory,
                    records,
                    max_bytes=config.spool_max_bytes,
                    max_age=config.spool_max_age,
                    durability=config.durability,
                    destination=Destination(config.endpoint_url, config.app_id),
                )
        except Exception:
            log.warning(
                "could not write %d signal(s) to the spool at exit", len(records), exc_info=True
            )
            return 0, len(records), 0
        # rejected: this write's own oldest that did not fit (never on disk).
        return len(result.ids), result.failed, result.evicted + result.rejected

    def _counts(self) -> tuple[int, int, dict[str, int]]:
        acc = self.accounting
        return acc.sent + acc.recovered, acc.spooled, dict(acc.dropped)

    def _result_since(self, before: tuple[int, int, dict[str, int]]) -> FlushResult:
        sent, spooled, dropped = self._counts()
        delta = {k: v - before[2].get(k, 0) for k, v in dropped.items()}
        return FlushResult(
            sent=sent - before[0],
            spooled=spooled - before[1],
            dropped={k: v for k, v in delta.items() if v},
            pending=self.pending,
        )
