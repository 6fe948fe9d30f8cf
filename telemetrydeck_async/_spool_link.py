"""The flusher's link to the on-disk spool: open, write ahead, spill, recover, heartbeat.

One :class:`SpoolLink` per client, created by the flusher whether or not ``spool_dir`` is set
(without one, every spill is a drop). It owns:

* opening the spool in the background at start, and closing it last at close;
* durability ``"always"``: the write-ahead of each signal before ``signal()`` returns;
* the overflow writer: signals that did not fit in the queue, encoded, wait in a bounded
  buffer for one background task that appends them in chunks;
* ``spill_or_drop``: a batch that cannot be sent now goes to disk, or, without a spool, is
  dropped; ``drop`` and ``forget`` delete what of a finished batch is on disk;
* recovery: spooled signals are claimed and handed to the flusher's send loop whenever the
  endpoint's health allows; the same loop renews this process's lease and reads the spool's
  figures for ``stats``.

The flusher reaches the send side through the small :class:`Sender` protocol; nothing here
imports the flusher or the client. To change how recovery works, this is the file to open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any, Protocol

import attrs

from ._batcher import Batch, batch_budget
from ._config import ClientConfig
from ._signal import Signal, encode_signal
from ._spool import (
    AppendResult,
    Destination,
    Spool,
    SpoolRecord,
    append_pending_blocking,
    open_spool,
)
from ._stats import Accounting, DropReason, decode_bodies
from .exceptions import SpoolError

__all__ = ["AWAITED_OVERFLOW", "OVERFLOW_BUFFER", "OVERFLOW_BYTES", "Sender", "SpoolLink"]

log = logging.getLogger("telemetrydeck_async")

#: ``seq`` of batches read back from the spool: after every flush() target, never waited for.
RECOVERED_SEQ = 2**62
#: Encoded signals that may wait in memory for the spool writer (beside the queue itself),
#: at most; and at most this many bytes of them (``_ENTRY_BYTES`` each on top of the body).
#: Big enough that a burst of 100,000 typical signals from a loop that rarely yields waits
#: for the disk instead of being dropped; bounded, so memory stays flat in a long outage.
OVERFLOW_BUFFER = 100_000
OVERFLOW_BYTES = 32 * 2**20
#: Awaiting callers (``await signal()``) can wait: past this many overflow signals they wait
#: for the spool writer, which keeps memory small when they outrun the disk.
AWAITED_OVERFLOW = 10_000
#: What one waiting signal costs beside its body: the tuple, the bytes and float objects.
_ENTRY_BYTES = 120
#: Overflowing signals written to the spool per transaction. 5,000 spilled faster but the
#: spool thread then held the GIL for milliseconds at a time, stalling a busy loop more.
_SPILL_CHUNK = 1_000
#: Overflowing signals made into records per turn of the loop while a chunk is prepared:
#: the loop's callers run in between, so preparing a chunk never stalls them for long.
_SPILL_SLICE = 500
#: Batches claimed from the spool in one transaction while recovering at full pace.
_CLAIM_BATCHES = 8
#: A lease is renewed this many times within its length: two renewals may be missed (a busy
#: disk, a stalled loop) before another process takes this one's records over.
_HEARTBEATS_PER_LEASE = 3


class Sender(Protocol):
    """What recovery needs of the send loop (the flusher implements it)."""

    @property
    def stopping(self) -> bool:
        """True once the client is closing: recovery stops."""

    @property
    def healthy(self) -> bool:
        """True while requests may go at full pace (not probing, not retrying)."""

    def may_recover(self) -> bool:
        """True while a recovered batch may be sent now (the endpoint's health rule)."""

    async def acquire_slot(self) -> None:
        """Wait for a free request slot (of ``max_concurrent_requests``)."""

    def release_slot(self) -> None:
        """Give back a slot that was not used."""

    def launch(self, batch: Batch) -> None:
        """Send ``batch`` in the slot the caller holds."""


@attrs.define(eq=False)
class SpoolLink:
    """The spool as the flusher uses it; see the module documentation."""

    config: ClientConfig
    accounting: Accounting
    #: The open spool once ``spool_dir`` is configured and the spool has opened; else None.
    spool: Spool | None = attrs.field(default=None, init=False)
    # Spool acks and overflow spills run beside deliveries; close() waits for them.
    _background: set[asyncio.Future[Any]] = attrs.field(factory=set, init=False)
    _opening: asyncio.Task[Spool | None] | None = attrs.field(default=None, init=False)
    _recovery: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    # Signals that overflowed the queue, encoded, waiting for one background spill.
    _overflow: deque[tuple[bytes, float]] = attrs.field(factory=deque, init=False)
    # The overflow signals the spool writer is storing right now (still in memory, pending).
    _overflow_chunk: list[tuple[bytes, float]] = attrs.field(factory=list, init=False)
    _overflow_task: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    # Bytes of the overflow (waiting and being written), as counted against OVERFLOW_BYTES.
    _overflow_bytes: int = attrs.field(default=0, init=False)

    # ----------------------------------------------------------------------------- open

    def start(self, loop: asyncio.AbstractEventLoop, sender: Sender) -> None:
        """Open the spool in the background and start recovering (no-op without spool_dir)."""
        if self.config.spool_dir is not None:
            self._opening = loop.create_task(
                self._open(self.config.spool_dir), name="telemetrydeck-spool-open"
            )
            self._recovery = loop.create_task(
                self._recover_forever(sender), name="telemetrydeck-spool-recovery"
            )

    async def _open(self, directory: str) -> Spool | None:
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
        await self._read_figures(spool)
        return spool

    async def ready(self, timeout: float) -> None:
        """Wait (bounded) until the spool has opened, or failed to; no-op without a spool."""
        opening = self._opening
        if opening is not None and not opening.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(opening), timeout)

    async def usable(self) -> Spool | None:
        """The spool once it has opened, or None (not configured, failed, disabled, closed)."""
        opening = self._opening
        if opening is None:
            return None
        spool = await asyncio.shield(opening) if not opening.done() else opening.result()
        if spool is None or spool.disabled or spool.closed:
            return None
        return spool

    async def _read_figures(self, spool: Spool) -> None:
        status = await spool.status()
        if status.error is not None:
            # Unknown is not empty: a failed read must not tell ``spool drain`` (or anyone
            # watching stats) that everything was sent.
            self.accounting.record_spool_figures(None, None)
            self.accounting.record_error(SpoolError(f"could not read the spool: {status.error}"))
            return
        self.accounting.record_spool_figures(status.records, status.bytes)

    # ----------------------------------------------------------------------------- write

    async def write_ahead(self, signal: Signal) -> int | None:
        """Durability "always": store ``signal`` on disk before ``signal()`` returns.

        Returns its record id, or None when the spool cannot take it (the signal then goes on
        from memory; the spool logs and counts the failure).
        """
        spool = await self.usable()
        if spool is None:
            return None
        record = SpoolRecord(signal.received_at, encode_signal(signal, self.config.app_id))
        result = await spool.append([record], claimed=True)
        # Only records that were on disk before count as dropped from the spool: a record
        # that did not fit itself goes on from memory.
        own = 1 - len(result.ids) - result.failed
        self.accounting.record_dropped("spool_full", result.evicted - max(own, 0), from_spool=True)
        return result.ids[0] if result.ids else None

    async def spill_or_drop(self, batch: Batch, reason: DropReason, detail: str = "") -> None:
        """Put a batch that cannot be sent now in the spool; without one, drop it."""
        spool = await self.usable()
        if spool is None:
            self.drop(batch, reason, detail)
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
            self.later(spool.release(written))
            self.accounting.record_spooled(len(written))
        if result is not None:
            self._record_stored(rest.bodies, result, detail)

    def _record_stored(self, bodies: list[bytes], result: AppendResult, detail: str) -> None:
        self.accounting.record_stored(
            bodies,
            len(result.ids),
            result.failed,
            # rejected: this write's own oldest that did not fit (never on disk).
            result.evicted + result.rejected,
            detail,
        )

    def hand_back(self, batch: Batch) -> None:
        """A delivery was cancelled: what of ``batch`` is on disk goes back to the spool."""
        written = batch.written_ids()
        if written and self.spool is not None:
            self.later(self.spool.release(written))
            if not batch.recovered:
                self.accounting.record_spooled(len(written))

    def drop(self, batch: Batch, reason: DropReason, detail: str = "") -> None:
        """Account ``batch`` as dropped and delete what of it is on disk."""
        bodies = batch.bodies
        self.accounting.record_dropped(
            reason, len(batch), lambda: decode_bodies(bodies), detail, from_spool=batch.recovered
        )
        self.forget(batch)

    def forget(self, batch: Batch) -> None:
        """The batch reached a final state: delete whatever of it is on disk."""
        if batch.spool_ids and self.spool is not None:
            written = batch.written_ids()
            if written:
                self.later(self.spool.ack(written))

    def later(self, work: Any) -> None:
        """Run spool work in the background; close() waits for it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----------------------------------------------------------------------------- overflow

    @property
    def overflow_depth(self) -> int:
        """Overflow signals in memory, waiting for (or being stored by) the spool writer."""
        return len(self._overflow) + len(self._overflow_chunk)

    def overflow(self, signal: Signal, spool_id: int | None = None) -> None:
        """A signal did not fit in the queue: spool it in the background, or drop it."""
        if spool_id is not None and self.spool is not None:
            # Written ahead: it is on disk already; hand it to the spool for later.
            self.accounting.record_spooled(1)
            self.later(self.spool.release([spool_id]))
            return
        body = encode_signal(signal, self.config.app_id)
        if self.config.spool_dir is None:
            self.drop(Batch([body], [signal.received_at], -1), "queue_full")
            return
        # One background writer for all overflowing signals, not a task per signal.
        self._overflow.append((body, signal.received_at))
        self._overflow_bytes += len(body) + _ENTRY_BYTES
        # Bounded, the chunk being written included: a burst from synchronous code can outrun
        # the disk for a moment, but memory stays capped however slow the disk is.
        while self._overflow and self._overflow_full(0):
            old_body, old_at = self._overflow.popleft()
            self._overflow_bytes -= len(old_body) + _ENTRY_BYTES
            self.drop(Batch([old_body], [old_at], -1), "queue_full")
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
        if self.overflow_depth < AWAITED_OVERFLOW and not self._overflow_full(1):
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout)

    def _overflow_full(self, slack: int) -> bool:
        """True when the overflow is over its bound (by more than ``slack`` signals)."""
        depth = self.overflow_depth
        return depth > OVERFLOW_BUFFER - slack or (
            depth > 1 and self._overflow_bytes > OVERFLOW_BYTES
        )

    async def _spill_overflow(self) -> None:
        # One deque for the client's life (emptied in place, never replaced): a chunk handed
        # back below always lands where close() and the exit hook look.
        overflow = self._overflow
        while overflow:
            chunk = self._overflow_chunk = []
            bodies: list[bytes] = []
            records: list[SpoolRecord] = []
            try:
                spool = await self.usable()
                # A large chunk per write, its records made a slice per turn of the loop.
                while overflow and len(chunk) < _SPILL_CHUNK:
                    if chunk:
                        await asyncio.sleep(0)
                    take = min(len(overflow), _SPILL_SLICE, _SPILL_CHUNK - len(chunk))
                    part = [overflow.popleft() for _ in range(take)]
                    chunk += part
                    bodies += [body for body, _ in part]
                    records += [SpoolRecord(at, body) for body, at in part]
                if spool is None:
                    self.drop(Batch(bodies, [at for _, at in chunk], -1), "queue_full")
                else:
                    result = await spool.append(records)
                    self._record_stored(bodies, result, "")
            except asyncio.CancelledError:
                # Not written (or not known to be): back in front of the rest, where a
                # close() or the exit hook finds it.
                overflow.extendleft(reversed(chunk))
                chunk = []
                raise
            finally:
                self._overflow_chunk = []
                self._overflow_bytes -= sum(len(body) for body, _ in chunk)
                self._overflow_bytes -= _ENTRY_BYTES * len(chunk)

    def take_overflow(self) -> Batch:
        """Every overflow signal still in memory, taken out (for an exit without a loop)."""
        overflow = [*self._overflow_chunk, *self._overflow]
        self._overflow.clear()
        self._overflow_chunk = []
        self._overflow_bytes = 0
        return Batch([b for b, _ in overflow], [at for _, at in overflow], -1)

    def append_blocking(self, records: list[SpoolRecord]) -> tuple[int, int, int]:
        """Store ``records`` pending, blocking, with no event loop; (stored, failed, evicted).

        For an exit without a loop: through this process's open spool when it has one,
        otherwise the configured directory is opened just for this write, in the calling
        thread. ``evicted`` includes this write's own oldest that did not fit (``rejected``).
        """
        config = self.config
        directory = config.spool_dir
        assert directory is not None  # the caller checks spool_dir
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
        return len(result.ids), result.failed, result.evicted + result.rejected

    # ----------------------------------------------------------------------------- recovery

    async def _recover_forever(self, sender: Sender) -> None:
        """Send what the spool holds, oldest first, whenever the endpoint is healthy.

        Runs from start-up until close; also renews this process's lease on its records.
        """
        spool = await self.usable()
        if spool is None:
            return
        interval = min(self.config.flush_interval, 5.0)
        heartbeat_interval = spool.lease / _HEARTBEATS_PER_LEASE
        beat = time.monotonic()
        while not sender.stopping:
            try:
                if sender.may_recover():
                    await self._recover_some(spool, sender)
                if time.monotonic() - beat >= heartbeat_interval:
                    beat = time.monotonic()
                    await spool.heartbeat()
                await self._read_figures(spool)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep recovering later; never into the app
                log.warning("error while sending spooled signals; will retry", exc_info=True)
                self.accounting.record_error(exc)
            await asyncio.sleep(interval)

    async def _recover_some(self, spool: Spool, sender: Sender) -> None:
        """Claim and send spooled batches until the spool is empty or the endpoint fails.

        At full pace the next claim runs in the spool's thread while the batches of the last
        one are being sent, so a free request slot never waits for the disk; each claim takes
        several batches in one transaction. While the endpoint is not healthy (a probe, one
        request at a time) one batch is claimed at a time. Claimed batches not sent when this
        stops go back to the spool.
        """
        config = self.config
        budget = batch_budget(config.max_batch_bytes, config.batch_size)
        ready: deque[Batch] = deque()
        claiming: asyncio.Future[list[Batch]] | None = None
        exhausted = False
        try:
            while sender.may_recover():
                if not ready:
                    if exhausted:
                        return
                    if claiming is None:
                        claiming = asyncio.ensure_future(self._claim(spool, sender, budget))
                    batches = await claiming
                    claiming = None
                    exhausted = not batches
                    ready.extend(batches)
                    continue  # the claim took a while: ask the health rule again
                if claiming is None and not exhausted and sender.healthy:
                    # Read the next batches from disk while these are sent.
                    claiming = asyncio.ensure_future(self._claim(spool, sender, budget))
                await sender.acquire_slot()
                if not sender.may_recover():
                    sender.release_slot()
                    return
                sender.launch(ready.popleft())
        finally:
            if claiming is not None:
                if claiming.done():
                    if not claiming.cancelled() and claiming.exception() is None:
                        ready.extend(claiming.result())
                else:
                    # The spool gives back what a cancelled claim had already taken.
                    claiming.cancel()
            unsent = [i for batch in ready for i in batch.written_ids()]
            if unsent:
                self.later(spool.release(unsent))

    def _claim_size(self, sender: Sender) -> int:
        """Batches per claim: one while probing, else enough to keep every slot busy."""
        if not sender.healthy:
            return 1
        return max(_CLAIM_BATCHES, self.config.max_concurrent_requests)

    async def _claim(self, spool: Spool, sender: Sender, budget: int) -> list[Batch]:
        """One transaction: up to :meth:`_claim_size` batches of spooled signals."""
        claims = await spool.claim_batches(self._claim_size(sender), self.config.batch_size, budget)
        self.accounting.record_dropped("expired", claims[0].expired, from_spool=True)
        batches = []
        for claim in claims:
            if claim.records:
                ids: list[int | None] = [record_id for record_id, _ in claim.records]
                bodies = [body for _, body in claim.records]
                batches.append(
                    Batch(bodies, [0.0] * len(bodies), RECOVERED_SEQ, ids, recovered=True)
                )
        return batches

    # ----------------------------------------------------------------------------- close

    async def stop_recovering(self) -> None:
        """Cancel the recovery loop and wait for it to end."""
        task = self._recovery
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def settle(self, timeout: float) -> None:
        """Wait (bounded) for the spool writes and acks already started.

        ``flush()`` ends with it: a process frozen or killed right after (AWS Lambda, a job
        ending with ``os._exit``) must not find delivered records still on disk at its next
        start, or they are sent again.
        """
        if self._background and timeout > 0:
            await asyncio.wait(list(self._background), timeout=timeout)

    async def close(self, end: float) -> None:
        """At close, by loop time ``end``: finish background writes, drop what the disk could
        not take in time, read the last figures and close the spool."""
        loop = asyncio.get_running_loop()
        if self._background:
            await asyncio.wait(list(self._background), timeout=max(end - loop.time(), 0.05))
        if self._overflow:  # the disk was too slow for the close budget
            chunk = list(self._overflow)
            self._overflow.clear()
            self._overflow_bytes = 0
            self.drop(Batch([b for b, _ in chunk], [at for _, at in chunk], -1), "shutdown")
        # The spool may still be opening (a very short-lived client): wait, then close it, so
        # its thread never outlives the client.
        spool = None if self._opening is None else await asyncio.shield(self._opening)
        if spool is not None:
            if not spool.disabled and not spool.closed:
                await self._read_figures(spool)
            await spool.close()
