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
* 401/403/404: the app ID or namespace is wrong. One ERROR is logged, the batch is kept (spool
  or memory) and the endpoint is probed every ``auth_probe_interval`` instead of hammered.

Nothing here raises into the caller: unexpected exceptions are logged with a traceback and the
loop keeps serving; ``flush()`` waiters are woken whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import attrs

from ._batcher import Batch, Batcher
from ._config import ClientConfig
from ._retry import retry_call
from ._signal import Signal, encode_signal
from ._stats import Accounting, DropReason, FlushResult, decode_bodies
from ._transport import Transport
from .exceptions import (
    AuthenticationError,
    DeliveryError,
    PayloadTooLargeError,
    RejectedError,
    RetryableStatusError,
)

__all__ = ["Flusher", "SpoolSink"]

log = logging.getLogger("telemetrydeck_async")

# Statuses that mean "the server as a whole is overloaded": every request waits, not just one.
_PAUSING_STATUSES = frozenset({429, 503})


class _Interrupted(Exception):
    """Raised inside a delivery when the client is closing and its time is up."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Fetch an abandoned request's outcome so asyncio does not warn it was never retrieved."""
    if not future.cancelled():
        future.exception()


class SpoolSink(Protocol):
    """What the flusher needs of the on-disk spool (``_spool.Spool`` implements it)."""

    async def spill(self, batch: Batch) -> tuple[int, int, int]:
        """Persist ``batch``; return (stored, failed, evicted)."""

    async def ack(self, ids: Sequence[int]) -> None:
        """Forget records that reached a final state (sent or dropped)."""

    async def release(self, ids: Sequence[int]) -> None:
        """Give records back to the spool for a later attempt."""


@attrs.define(eq=False)
class Flusher:
    """Owns the background task, the in-flight deliveries and the delivery policy."""

    config: ClientConfig
    batcher: Batcher
    transport: Transport
    accounting: Accounting
    spool: SpoolSink | None = None
    in_flight: int = 0
    _task: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    _deliveries: dict[asyncio.Task[None], Batch] = attrs.field(factory=dict, init=False)
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
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="telemetrydeck-flusher"
            )
            self._task.add_done_callback(self._on_task_done)

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
            self.in_flight += len(batch)
            task = asyncio.get_running_loop().create_task(self._deliver(batch))
            self._deliveries[task] = batch
            task.add_done_callback(self._delivery_done)
            if self.endpoint_refusing:
                return  # one probe at a time

    def _next_batch(self) -> Batch | None:
        if self._parked:
            return self._parked.popleft()
        return self.batcher.take()

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        batch = self._deliveries.pop(task, None)
        if batch is not None:
            self.in_flight -= len(batch)
        self._slots.release()
        self._progress.set()
        self.batcher.wakeup.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("a delivery task failed unexpectedly", exc_info=task.exception())

    # ----------------------------------------------------------------------------- delivery

    async def _deliver(self, batch: Batch) -> None:
        deadline = time.monotonic() + self.config.retry.deadline
        try:
            await self._deliver_until(batch, deadline)
        except asyncio.CancelledError:
            # Cancelled by a close() out of time: the batch is accounted, never silently lost.
            self._drop(batch, "shutdown")
            raise

    async def _deliver_until(self, batch: Batch, deadline: float) -> None:
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
            if len(batch) == 1:
                self._drop(batch, "oversize", str(exc))
            else:
                for half in batch.split():
                    await self._deliver_until(half, deadline)
        except RejectedError as exc:
            if len(batch) == 1:
                self.accounting.record_error(exc)
                self._drop(batch, "rejected", exc.body[:200])
            else:
                for half in batch.split():
                    await self._deliver_until(half, deadline)
        except AuthenticationError as exc:
            self.accounting.record_error(exc)
            self._on_auth_failure(exc)
            await self._keep(batch)
        except _Interrupted:
            await self._spill_or_drop(batch, "shutdown")
        except DeliveryError as exc:
            self.accounting.record_error(exc)
            reason: DropReason = "retries_exhausted" if exc.retryable else "permanent_error"
            if exc.retryable:
                await self._spill_or_drop(batch, reason, str(exc))
            else:
                self._drop(batch, reason, str(exc))
        else:
            self._on_sent(batch)

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
                "ingest endpoint answered %d; pausing all requests for %.1f s",
                exc.status,
                wait,
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
        self.accounting.retried_requests += 1
        self._failing = True
        self.accounting.record_error(exc)
        self.accounting.warnings.log(
            logging.WARNING,
            f"retry:{type(exc).__name__}",
            "request to the ingest endpoint failed (%s); retrying in %.1f s",
            exc,
            wait,
        )

    def _on_auth_failure(self, exc: AuthenticationError) -> None:
        if self._auth_failed_at is None:
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
        if batch.spool_ids and self.spool is not None:
            self._spool_later(self.spool.ack(batch.spool_ids))

    # ----------------------------------------------------------------------------- outcomes

    async def _keep(self, batch: Batch) -> None:
        """Hold a refused batch: in the spool if there is one, else parked in memory."""
        if self.spool is not None:
            await self._spill_or_drop(batch, "retries_exhausted")
            return
        self._parked.append(batch)
        # Parked signals count against the queue's bound: memory stays flat during the outage.
        while self.parked + len(self.batcher) > self.config.max_queue_size and self._parked:
            self._drop(self._parked.popleft(), "queue_full")

    async def _spill_or_drop(self, batch: Batch, reason: DropReason, detail: str = "") -> None:
        if self.spool is None:
            self._drop(batch, reason, detail)
            return
        if batch.spool_ids:
            # Already on disk (written ahead, or recovered): hand it back for a later attempt.
            await self.spool.release(batch.spool_ids)
            if not batch.recovered:
                self.accounting.spooled += len(batch)
            return
        stored, failed, evicted = await self.spool.spill(batch)
        self.accounting.spooled += stored
        self.accounting.record_dropped("spool_error", failed)
        self.accounting.record_dropped("spool_full", evicted)

    def _drop(self, batch: Batch, reason: DropReason, detail: str = "") -> None:
        bodies = batch.bodies
        self.accounting.record_dropped(reason, len(batch), lambda: decode_bodies(bodies), detail)
        if batch.spool_ids and self.spool is not None:
            self._spool_later(self.spool.ack(batch.spool_ids))

    def _spool_later(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----------------------------------------------------------------------------- flush, close

    def _flushed(self, target: int) -> bool:
        if self.endpoint_refusing:
            return True  # nothing moves until a probe succeeds: report the rest as pending
        if self.batcher.taken_total < target and self.batcher:
            return False
        return all(b.seq >= target for b in self._deliveries.values())

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
        """Flush within ``timeout``, then spool or drop what is left and stop the task."""
        before = self._counts()
        self._stopping = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        # Keep a little of the budget to spool what could not be sent.
        grace = min(1.0, timeout * 0.2)
        if self.running:
            await self.flush(timeout=max(end - grace - loop.time(), 0.0))
        # Stop dispatching first, so no new delivery starts behind our back.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._interrupt.set()
        if self._deliveries:
            _, still = await asyncio.wait(
                list(self._deliveries), timeout=max(end - loop.time(), 0.05)
            )
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
        for batch in [*self._parked, *self.batcher.drain()]:
            await self._spill_or_drop(batch, "shutdown")
        self._parked.clear()
        if self._background:
            await asyncio.wait(list(self._background), timeout=max(end - loop.time(), 0.05))
        self._progress.set()
        result = self._result_since(before)
        if result.dropped:
            log.warning(
                "client closed; %d signal(s) could not be sent or spooled: %s",
                result.dropped_total,
                ", ".join(f"{n} {reason}" for reason, n in sorted(result.dropped.items())),
            )
        return result

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
            pending=len(self.batcher) + self.in_flight + self.parked,
        )

    def overflow(self, signal: Signal) -> None:
        """A signal did not fit in the queue: spool it in the background, or drop it."""
        batch = Batch([encode_signal(signal, self.config.app_id)], [signal.received_at], -1)
        if self.spool is None:
            self._drop(batch, "queue_full")
            return
        self._spool_later(self._spill_or_drop(batch, "queue_full"))
