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
from ._health import PAUSING_STATUSES, EndpointHealth, describe_wait
from ._retry import retry_call
from ._signal import Signal, encode_signal
from ._spool import Spool, SpoolRecord
from ._spool_link import SpoolLink
from ._stats import Accounting, FlushResult, decode_bodies
from ._transport import Transport
from .exceptions import (
    AuthenticationError,
    CertificateError,
    ClientClosedError,
    DeliveryError,
    PayloadTooLargeError,
    RejectedError,
    RetryableStatusError,
)

__all__ = ["Flusher", "take_back"]

log = logging.getLogger("telemetrydeck_async")


@attrs.define(eq=False)
class Flusher:
    """Owns the background task, the in-flight deliveries and the outcome of each answer.

    The endpoint's health (pause, refusal, failing) lives in :class:`EndpointHealth`, the
    spool (write-ahead, overflow, recovery) in :class:`SpoolLink`; the flusher asks the one
    and hands batches to the other.
    """

    config: ClientConfig
    batcher: Batcher
    transport: Transport
    accounting: Accounting
    health: EndpointHealth = attrs.field(init=False)
    link: SpoolLink = attrs.field(init=False)
    _task: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    # Each delivery task with the sub-batches it has not accounted yet (a 413 or 400 splits a
    # batch): in-flight counts are read from here, so a signal is never counted twice.
    _deliveries: dict[asyncio.Task[None], list[Batch]] = attrs.field(factory=dict, init=False)
    _slots: asyncio.Semaphore = attrs.field(init=False)
    # The deliveries waiting on the endpoint (a request, a pause, a backoff), not writing to
    # the spool: a close whose time to send is spent cancels these at once (_send).
    _sending: set[asyncio.Task[Any]] = attrs.field(factory=set, init=False)
    _progress: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _force_until: int = attrs.field(default=0, init=False)
    _parked: deque[Batch] = attrs.field(factory=deque, init=False)
    #: Signals other threads handed over (``signal_threadsafe()``) that the loop has not queued
    #: yet; the loop takes them in one callback per burst. Here rather than in the client, so
    #: that a close and the exit hook, which hold the pipeline, count them too.
    handed_over: deque[Signal] = attrs.field(factory=deque, init=False)

    def __attrs_post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.config.max_concurrent_requests)
        self.health = EndpointHealth(self.config, self.accounting)
        self.link = SpoolLink(self.config, self.accounting)

    # ----------------------------------------------------------------------------- intake

    def admit(self, signal: Signal, spool_id: int | None = None) -> bool:
        """Queue a validated signal, counted as enqueued; spill or drop it when the queue is full.

        The pipeline's one way in (the client binds it as its ``_enqueue``). False: the queue
        was full and the signal went to the spool's overflow (or was dropped).
        """
        self.accounting.record_enqueued()
        if self.batcher.put(signal, spool_id):
            return True
        self.link.overflow(signal, spool_id)
        return False

    def take_handed_over(self) -> bool:
        """On the loop: queue the signals other threads had handed over when it began.

        Only those: threads that keep handing over must not hold the loop in this call (a
        ``loop.stop()`` or a close behind it would never run). True when more arrived
        meanwhile, for the caller to schedule another turn. Once the flusher is stopping
        nothing sends the queue for long, so each is counted and dropped (``shutdown``)
        instead; the close itself queues those handed over before it.
        """
        inbox = self.handed_over
        take = inbox.popleft
        count = len(inbox)
        if not self._stopping:
            while count and inbox:  # a racing caller may have taken its own back
                count -= 1
                self.admit(take())
            return bool(inbox)
        bodies = []
        while count and inbox:
            count -= 1
            self.accounting.record_enqueued()
            bodies.append(encode_signal(take(), self.config.app_id))
        if bodies:
            self.accounting.record_dropped("shutdown", len(bodies), lambda: decode_bodies(bodies))
        return bool(inbox)

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
        return len(self.batcher) + self.link.overflow_depth

    @property
    def pending(self) -> int:
        """Signals of this process not yet sent, spooled or dropped."""
        return self.queue_depth + self.in_flight + self.parked

    @property
    def healthy(self) -> bool:
        """True while requests succeed: no failure since the last 2xx, no pause, no refusal."""
        return self.running and self.health.may_send(alone=False)

    @property
    def endpoint_refusing(self) -> bool:
        """True while the endpoint answers 401/403/404 (until a probe succeeds)."""
        return self.health.refusing

    @property
    def spool(self) -> Spool | None:
        """The open spool once ``spool_dir`` is configured and the spool has opened; else None."""
        return self.link.spool

    @property
    def stopping(self) -> bool:
        """True once close() has begun."""
        return self._stopping

    def start(self) -> None:
        """Start the background task in the running loop (idempotent)."""
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name="telemetrydeck-flusher")
            self._task.add_done_callback(self._on_task_done)
            self.link.start(loop, self)

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
            return self.health.probe_due()
        if not self.batcher:
            return False
        if self.endpoint_refusing:
            return self.health.probe_due()
        return (
            self._stopping
            or self.batcher.taken_total < self._force_until
            or self.batcher.full_batch_ready()
            or self.batcher.oldest_age() >= self.config.flush_interval
        )

    async def _wait_for_work(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = self.batcher.wakeup
        while not self._sendable():
            if self._stopping and not self.batcher and not self._parked:
                return
            wakeup.clear()
            delay: float | None = None
            if self.endpoint_refusing:
                delay = self.health.probe_wait()
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
            self.launch(batch)
            if self.endpoint_refusing:
                return  # one probe at a time
            # One batch cut and encoded per turn of the loop: the caller's coroutines run in
            # between, so a burst never holds the loop for several batches' encoding.
            await asyncio.sleep(0)

    async def acquire_slot(self) -> None:
        """Wait for one of the ``max_concurrent_requests`` request slots."""
        await self._slots.acquire()

    def release_slot(self) -> None:
        """Give back a slot that no delivery used."""
        self._slots.release()

    def may_recover(self) -> bool:
        """Spooled signals go out while the endpoint works, or as the probe once it failed.

        After a failure, one recovered batch at a time tests the endpoint (with the usual
        backoff) once nothing else is in flight; a success resumes the full pace. While the
        endpoint refuses the configuration (401/403/404, 3xx), one recovered batch is the
        probe every ``auth_probe_interval``: with everything spooled, nothing else would ask.
        """
        return (
            self.running and not self._stopping and self.health.may_send(alone=not self._deliveries)
        )

    def launch(self, batch: Batch) -> None:
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
        self.link.hand_back(batch)
        rest = batch.not_written()
        if not batch.recovered and rest.bodies:
            self._parked.appendleft(rest)

    async def _deliver_once(self, batch: Batch, deadline: float) -> tuple[Batch, Batch] | None:
        """Send ``batch`` with retries and account it; or return its halves to send instead."""
        try:
            await self._send(batch.payload(), deadline)
        except PayloadTooLargeError as exc:
            self.accounting.record_error(exc)
            if len(batch) > 1:
                return batch.split()
            self.link.drop(batch, "oversize", str(exc))
        except RejectedError as exc:
            if len(batch) > 1:
                return batch.split()  # bisect: one bad signal must not sink the others
            self.accounting.record_error(exc)
            self.link.drop(batch, "rejected", exc.body[:200])
        except (AuthenticationError, CertificateError) as exc:
            self.accounting.record_error(exc)
            self.health.on_refused(exc, self.transport.url)
            await self._keep(batch)
        except DeliveryError as exc:
            self.accounting.record_error(exc)
            if exc.retryable:
                await self.link.spill_or_drop(batch, "retries_exhausted", str(exc))
            else:
                self.link.drop(batch, "permanent_error", str(exc))
        else:
            self._on_sent(batch)
        return None

    async def _send(self, body: bytes, deadline: float) -> None:
        """POST ``body``, retried until ``deadline``; close() may cancel it meanwhile.

        While a delivery waits on the endpoint (a request, a pause, a backoff) it is in
        ``_sending``: a close whose time to send is spent cancels it, and the delivery hands
        its batch back (``_deliver``) for close() to spool or drop. Cancelling the task is the
        whole interrupt: no second task, future or event per request.
        """
        task = asyncio.current_task()
        assert task is not None  # deliveries run in tasks (launch)
        self._sending.add(task)
        try:
            await retry_call(
                self.config.retry,
                lambda: self._attempt(body),
                sleep=asyncio.sleep,
                deadline=max(deadline - time.monotonic(), 0.001),
                on_retry=self._on_retry,
            )
        finally:
            self._sending.discard(task)

    async def _attempt(self, body: bytes) -> None:
        await self.health.wait_out_pause(asyncio.sleep)
        try:
            await self.transport.send(body)
        except RetryableStatusError as exc:
            if exc.status in PAUSING_STATUSES:
                self.health.pause(exc)
            raise

    def _on_retry(self, exc: BaseException, wait: float) -> None:
        self.accounting.record_retry()
        self.health.on_failure()
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

    def _on_sent(self, batch: Batch) -> None:
        self.health.on_success()
        self.accounting.record_sent(len(batch), recovered=batch.recovered)
        self.link.forget(batch)

    # ----------------------------------------------------------------------------- outcomes

    async def _keep(self, batch: Batch) -> None:
        """Hold a refused batch: in the spool if there is one, else parked in memory."""
        if await self.link.usable() is not None:
            await self.link.spill_or_drop(batch, "retries_exhausted")
            return
        self._parked.append(batch)
        # Parked signals count against the queue's bound: memory stays flat during the outage.
        while self.parked + len(self.batcher) > self.config.max_queue_size and self._parked:
            self.link.drop(self._parked.popleft(), "queue_full")

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
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wait_flushed(target), timeout)
        # Bounded even for flush(None): by close_timeout, as a close would be.
        settle = self.config.close_timeout if end is None else end - loop.time()
        await self.link.settle(settle)
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
        # Handed over before the close began: sent (or spooled) by it like any queued signal.
        while self.handed_over:
            self.admit(self.handed_over.popleft())
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
        await self.link.stop_recovering()
        # The time to send is spent: requests, pauses and backoffs end now. Each cancelled
        # delivery hands its batch back (parked, spooled or dropped below); the ones writing
        # to the spool get the rest of the budget to finish.
        for task in self._sending:
            task.cancel()
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
            await self.link.spill_or_drop(self._parked[0], "shutdown")
            self._parked.popleft()
        await self.link.close(end)
        self._progress.set()
        result = self._result_since(before)
        if result.dropped:
            log.warning(
                "client closed; %d signal(s) could not be sent or spooled: %s",
                result.dropped_total,
                ", ".join(f"{n} {reason}" for reason, n in sorted(result.dropped.items())),
            )
        spool_dropped = self.accounting.spool_dropped
        if spool_dropped:
            # The per-reason warnings are rate-limited: say the whole count once at the end.
            log.warning(
                "client closed; %d spooled signal(s) were given up in the spool while it ran: %s",
                sum(spool_dropped.values()),
                ", ".join(f"{n} {reason}" for reason, n in sorted(spool_dropped.items())),
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
        # Stopping first: a thread handing a signal over from now on takes it back itself.
        self._stopping = True
        handed = []
        while self.handed_over:
            handed.append(self.handed_over.popleft())
        self.accounting.record_enqueued(len(handed))
        overflow = self.link.take_overflow()
        batches = [
            batch
            for batch in [
                *self._parked,
                *(b for todo in self._deliveries.values() for b in todo),
                *self.batcher.drain(),
                overflow,
                Batch(
                    [encode_signal(signal, self.config.app_id) for signal in handed],
                    [signal.received_at for signal in handed],
                    -1,
                ),
            ]
            if not batch.recovered and batch.bodies
        ]
        self._parked.clear()
        self._deliveries.clear()
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
            stored, failed, evicted = self.link.append_blocking(records)
            self.accounting.record_stored(bodies, stored, failed, evicted, why)
        elif bodies:
            self.accounting.record_dropped(
                "shutdown", len(bodies), lambda: decode_bodies(bodies), why
            )
        result = self._result_since(before)
        if result.spooled:
            log.info("%d signal(s) written to the spool for the next run: %s", result.spooled, why)
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
            pending=self.pending,
        )


def take_back(inbox: deque[Signal], signal: Signal, why: str) -> None:
    """A close raced the hand-over of ``signal``: refuse it, unless the loop already took it.

    Still in ``inbox``: nobody counted it, and once the loop has stopped nobody will; it is
    removed and the caller told (``ClientClosedError``), as any call on a closed client is.
    Gone: the loop or the close took it, and it is in the books (sent, spooled, or dropped
    with reason ``shutdown``).
    """
    while True:
        try:
            inbox.remove(signal)
        except ValueError:
            return
        except RuntimeError:  # "deque mutated during remove()": nothing was removed; again
            continue
        raise ClientClosedError(f"{why}; the signal was not queued")
