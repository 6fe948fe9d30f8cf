"""The flusher's link to the on-disk spool: open, write ahead, spill, recover, heartbeat.

One :class:`SpoolLink` per client, created by the flusher whether or not ``spool_dir`` is set
(without one, every spill is a drop). It owns:

* opening the spool in the background at start, and closing it last at close;
* durability ``"always"``: the write-ahead of each signal before ``signal()`` returns;
* the overflow: signals that did not fit in the queue are encoded and gathered into chunks
  (one batch each) in the caller's own call; a full chunk goes straight to the spool's thread
  (no turn of the event loop needed), and its outcome is booked when the loop next turns.
  Memory is bounded: past it, the oldest chunk the thread has not begun to write is dropped;
* ``spill_or_drop``: a batch that cannot be sent now goes to disk, or, without a spool, is
  dropped; ``drop`` and ``forget`` delete what of a finished batch is on disk;
* recovery: spooled records are claimed and handed to the flusher's send loop whenever the
  endpoint's health allows (a chunk is a ready batch); a record is acked once every one of its
  signals is final, or released whole; the same loop renews this process's lease and reads
  the spool's figures for ``stats``.

The flusher reaches the send side through the small :class:`Sender` protocol; nothing here
imports the flusher or the client. To change how recovery works, this is the file to open.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import operator
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol, overload

import attrs

from ._batcher import Batch, batch_budget
from ._config import ClientConfig
from ._signal import Signal, encode_signal
from ._spool import (
    AppendResult,
    ClaimResult,
    Destination,
    Spool,
    SpoolRecord,
    _Job,
    append_pending_blocking,
    open_spool,
    split_chunk,
)
from ._stats import Accounting, DropReason, decode_bodies
from .exceptions import SpoolError

__all__ = ["AWAITED_OVERFLOW", "OVERFLOW_BUFFER", "OVERFLOW_BYTES", "Sender", "SpoolLink"]

log = logging.getLogger("telemetrydeck_async")

_BODY = operator.attrgetter("body")
_RECEIVED_AT = operator.attrgetter("received_at")

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
#: Batches claimed from the spool in one transaction while recovering at full pace.
_CLAIM_BATCHES = 32
#: Overflow chunks written in one transaction on the loop's thread when it does not turn:
#: they share the commit, which is most of a direct write's cost, and eight compressed chunks
#: are still a fraction of a millisecond to write.
_DEFERRED_CHUNKS = 8
#: Seconds a partly gathered overflow chunk waits for more signals before it is written.
_SEAL_AFTER = 0.05
#: Seconds the acks of recovered records are gathered before they go to the spool's thread.
_ACK_GATHER = 0.01
#: Seconds an exit without an event loop waits for a chunk the spool's thread is writing.
_EXIT_WAIT = 2.0
#: A lease is renewed this many times within its length: two renewals may be missed (a busy
#: disk, a stalled loop) before another process takes this one's records over.
_HEARTBEATS_PER_LEASE = 3


@attrs.define(eq=False)
class _Chunk:
    """Overflow signals sealed into one spool record, waiting for the spool's thread, until
    their outcome is accounted."""

    record: SpoolRecord
    received_at: list[float]
    #: What they count against OVERFLOW_BYTES.
    size: int
    #: The spool's ticket once handed to its thread; None while waiting for the spool to open.
    ticket: _Job[AppendResult] | None = None
    #: True once accounted (stored, dropped, or taken by an exit without a loop).
    settled: bool = False

    def bodies(self) -> list[bytes]:
        """The signals' bodies, cut out of the record (for a drop or an exit)."""
        return self.record.bodies()


class _Bodies(Sequence[bytes]):
    """The bodies of a chunk record for the books: its count at once, the bodies themselves
    only if someone reads them (an ``on_drop`` hook), so a chunk stored whole is never cut."""

    def __init__(self, record: SpoolRecord) -> None:
        self._record = record
        self._count = record.count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        return self._record.bodies()[index]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # a signal before the client's loop runs: written once it does
        return None


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
    # Signals that overflowed the queue, gathered into the next chunk (at most batch_size).
    _gather: list[Signal] = attrs.field(factory=list, init=False)
    # Sealed chunks to be written at the loop's next turn (a slice of their own), together;
    # written in a seal instead once _DEFERRED_CHUNKS of them wait (the loop has not turned).
    _deferred: list[_Chunk] = attrs.field(factory=list, init=False)
    _write_scheduled: bool = attrs.field(default=False, init=False)
    _seal_scheduled: bool = attrs.field(default=False, init=False)
    # Sealed chunks not yet accounted (waiting for the spool to open, or with its thread),
    # oldest first, and how many signals they hold.
    _chunks: deque[_Chunk] = attrs.field(factory=deque, init=False)
    _chunked: int = attrs.field(default=0, init=False)
    # The chunks of ``_chunks`` sealed before the spool had opened.
    _waiting: deque[_Chunk] = attrs.field(factory=deque, init=False)
    _overflow_task: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    # Bytes of the overflow (gathered and chunked), as counted against OVERFLOW_BYTES.
    _overflow_bytes: int = attrs.field(default=0, init=False)
    # Recovered records this process holds, by id: [signals of it not yet final here,
    # whether any of them was handed back]. A record is acked when every one of its signals
    # reached a final state, else released once none is in flight any more.
    _held: dict[int, list[int]] = attrs.field(factory=dict, init=False)
    # Recovered records to ack, gathered for _ACK_GATHER seconds.
    _acks: list[int] = attrs.field(factory=list, init=False)

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
        if batch.recovered:
            # Already on disk and counted there: hand it back for a later attempt.
            self._settle_recovered(spool, batch, handed_back=True)
            return
        written = batch.written_ids()
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

    def _record_stored(self, bodies: Sequence[bytes], result: AppendResult, detail: str) -> None:
        self.accounting.record_stored(
            bodies,
            result.stored,
            result.failed,
            # rejected: this write's own oldest that did not fit (never on disk).
            result.evicted + result.rejected,
            detail,
        )

    def hand_back(self, batch: Batch) -> None:
        """A delivery was cancelled: what of ``batch`` is on disk goes back to the spool."""
        spool = self.spool
        if spool is None:
            return
        if batch.recovered:
            self._settle_recovered(spool, batch, handed_back=True)
            return
        written = batch.written_ids()
        if written:
            self.later(spool.release(written))
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
        spool = self.spool
        if batch.spool_ids and spool is not None:
            if batch.recovered:
                self._settle_recovered(spool, batch, handed_back=False)
                return
            written = batch.written_ids()
            if written:
                self.later(spool.ack(written))

    def _settle_recovered(self, spool: Spool, batch: Batch, *, handed_back: bool) -> None:
        """Signals of recovered records are final here (or ``handed_back``): ack each record
        all of whose signals are final, release each one some of which were handed back,
        once none of its signals is in flight any more.

        A record's signals may travel in several batches (a 413 or 400 split a batch; a
        record larger than this client's batches): acking it while one is still in flight
        would lose that one if this process died; releasing it early would let another
        process send it while this one still does. Releasing sends all of its signals again
        later, the delivered ones too: at least once, never lost.
        """
        acks: list[int] = []
        releases: list[int] = []
        held = self._held
        for record_id, group in itertools.groupby(batch.spool_ids or ()):
            if record_id is None:
                continue
            state = held.get(record_id)
            if state is None:  # not claimed by this link (a test's record, a late answer)
                (releases if handed_back else acks).append(record_id)
                continue
            state[0] -= sum(1 for _ in group)
            state[1] |= handed_back
            if state[0] <= 0:
                del held[record_id]
                (releases if state[1] else acks).append(record_id)
        if releases:
            self.later(spool.release(releases))
        if acks:
            # Gathered for a moment: one transaction of the spool's thread for the acks of
            # many deliveries (each transaction costs that thread several GIL hand-offs,
            # which the loop's own socket calls then wait for).
            if not self._acks:
                loop = _running_loop()
                if loop is None:
                    self.later(spool.ack(acks))
                    return
                loop.call_later(_ACK_GATHER, self._send_acks)
            self._acks += acks

    def _send_acks(self) -> None:
        acks, self._acks = self._acks, []
        if acks and self.spool is not None:
            self.later(self.spool.ack(acks))

    def later(self, work: Any) -> None:
        """Run spool work in the background; close() waits for it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----------------------------------------------------------------------------- overflow

    @property
    def overflow_depth(self) -> int:
        """Overflow signals in memory: being gathered, waiting for, or with the spool writer."""
        return len(self._gather) + self._chunked

    def overflow(self, signal: Signal, spool_id: int | None = None) -> None:
        """A signal did not fit in the queue: spool it, or drop it.

        Runs in the caller's call (``signal_nowait()`` from code that may not yield for a long
        time), so nothing here waits for the loop to turn. The signal joins the next chunk as
        it is, like a put on the queue; a full chunk (``batch_size`` signals, each already
        encoded) is joined and compressed, and written to disk by this thread at the loop's
        next turn, or, when the loop does not turn, with the chunks sealed before it once
        there are ``_DEFERRED_CHUNKS`` (:meth:`Spool.append_many_now`, a fraction of a
        millisecond); when that cannot be done at once, they go to the spool's thread, which
        writes them while the caller keeps running (the signals stay pending until the result
        comes back to the loop).
        """
        gather = self._gather
        # Within a burst a chunk is being gathered: the signal joins it, nothing else to ask.
        if (not gather or spool_id is not None) and self._taken_otherwise(signal, spool_id):
            return
        gather.append(signal)
        if len(gather) >= self.config.batch_size:
            self._seal()

    def _taken_otherwise(self, signal: Signal, spool_id: int | None) -> bool:
        """:meth:`overflow`'s rarer cases: True when the signal was written ahead (handed
        back to the spool) or dropped (no spool_dir); else a chunk is about to begin (its seal
        is scheduled) and the signal goes into it."""
        if spool_id is not None and self.spool is not None:
            # Written ahead: it is on disk already; hand it to the spool for later.
            self.accounting.record_spooled(1)
            self.later(self.spool.release([spool_id]))
            return True
        if self.config.spool_dir is None:
            body = encode_signal(signal, self.config.app_id)
            self.drop(Batch([body], [signal.received_at], -1), "queue_full")
            return True
        if not self._gather and not self._seal_scheduled and (loop := _running_loop()) is not None:
            # What a burst leaves gathered goes to disk shortly after; not at the next turn
            # of the loop: a service that turns it between requests would write tiny chunks.
            self._seal_scheduled = True
            loop.call_later(_SEAL_AFTER, self._seal_on_turn)
        return False

    def _book_written(self) -> bool:
        """Book the oldest chunks the spool's thread has finished, in this call: a caller that
        never yields would otherwise see them count against the bound until the loop turns.
        True when any was booked (their future's callback, later, then does nothing)."""
        chunks = self._chunks
        booked = False
        while chunks:
            chunk = chunks[0]
            ticket = chunk.ticket
            done = None if ticket is None else ticket.done
            if ticket is None or done is None or not done.is_set() or ticket.outcome is None:
                break
            self._finish_chunk(chunk)
            self._record_stored(_Bodies(chunk.record), ticket.outcome, "")
            booked = True
        return booked

    def _seal_on_turn(self) -> None:
        self._seal_scheduled = False
        self._seal()

    def _seal(self) -> None:
        """The gathered signals become chunk records, written to disk by this loop's thread
        (:meth:`Spool.append_many_now`) at its next turn, or in a seal once
        ``_DEFERRED_CHUNKS`` wait for that turn; else handed to the spool's thread (or kept for
        the background writer, which waits for the spool to open)."""
        signals = self._gather
        if not signals:
            return
        self._gather = []
        self._book_written()
        spool = self.spool
        loop = _running_loop()
        per_signal = 0
        for record, received_at in self._chunk_records(signals):
            # Memory held: the record as stored (compressed), and each signal's time.
            size = len(record.body) + _ENTRY_BYTES * len(received_at)
            # What one signal of the next chunk holds while it gathers: its whole body.
            per_signal = record.wire_size // len(received_at) + _ENTRY_BYTES
            chunk = _Chunk(record, received_at, size)
            self._chunks.append(chunk)
            self._chunked += len(received_at)
            self._overflow_bytes += chunk.size
            if spool is not None and not self._waiting and loop is not None:
                self._deferred.append(chunk)
                if not self._write_scheduled:
                    self._write_scheduled = True
                    loop.call_soon(self._write_on_turn)
            else:
                self._waiting.append(chunk)
                if loop is not None:
                    self._start_overflow_writer()
        # Bounded, chunks with the writer included: a burst from synchronous code can outrun
        # the disk for a moment, but memory stays capped however slow the disk is. Room is
        # kept for the next chunk as it gathers (not chunked yet, so not counted in bytes):
        # as many signals as a chunk, of the size of the last one's (uncompressed).
        if len(self._deferred) >= _DEFERRED_CHUNKS:
            self._write_deferred()
        room = self.config.batch_size
        room_bytes = room * per_signal
        while self._overflow_full(room, room_bytes) and (
            self._book_written() or self._drop_oldest_overflow()
        ):
            pass

    def _write_on_turn(self) -> None:
        self._write_scheduled = False
        self._write_deferred()

    def _write_deferred(self) -> None:
        """Write the deferred chunks here and now, in one transaction, or hand them to the
        spool's thread."""
        # Skipped: dropped, or taken by an exit without a loop already.
        chunks = [chunk for chunk in self._deferred if not chunk.settled]
        self._deferred = []
        if not chunks:
            return
        spool = self.spool
        loop = _running_loop()
        if spool is None or loop is None:  # pragma: no cover - only deferred with both
            self._waiting.extend(chunks)
            return
        results = spool.append_many_now([chunk.record for chunk in chunks])
        if results is None:
            for chunk in chunks:
                self._hand_over(spool, chunk, loop)
            return
        for chunk, result in zip(chunks, results, strict=True):
            self._finish_chunk(chunk)
            self._record_stored(_Bodies(chunk.record), result, "")

    def _chunk_records(self, signals: list[Signal]) -> list[tuple[SpoolRecord, list[float]]]:
        """``signals`` as compressed spool records of at most one batch each (usually one
        record), with their times: cut signal by signal at the batch byte budget. Each signal
        carries its bytes (encoded as the client built it), so sealing a chunk only joins and
        compresses them. Runs on the caller's thread once per chunk, so each step is one call
        over the whole list, not a line of Python per signal."""
        received_at = list(map(_RECEIVED_AT, signals))
        bodies = list(map(_BODY, signals))
        # A body is never empty (a JSON object): a falsy one is a missing one. Asked this way,
        # not with ``None in bodies``, which compares every body with None.
        if not all(bodies):  # a signal built otherwise: encoded here
            app_id = self.config.app_id
            bodies = [encode_signal(signal, app_id) for signal in signals]
        budget = batch_budget(self.config.max_batch_bytes, self.config.batch_size)
        # The usual case: one batch. Joined once, for the check and for the record.
        if len(joined := b",".join(bodies)) <= budget:
            record = SpoolRecord.chunk(min(received_at), bodies, compress=True, joined=joined)
            return [(record, received_at)]
        records = []
        start = size = 0
        for end, one in enumerate(bodies):
            if end > start and size + len(one) > budget:
                times = received_at[start:end]
                record = SpoolRecord.chunk(min(times), bodies[start:end], compress=True)
                records.append((record, times))
                start, size = end, 0
            size += len(one) + 1
        times = received_at[start:]
        records.append((SpoolRecord.chunk(min(times), bodies[start:], compress=True), times))
        return records

    def _hand_over(self, spool: Spool, chunk: _Chunk, loop: asyncio.AbstractEventLoop) -> None:
        ticket = spool.hand_over(chunk.record, loop)
        if ticket is None or ticket.future is None:
            self._finish_chunk(chunk)
            self.drop(Batch(chunk.bodies(), chunk.received_at, -1), "queue_full")
            return
        chunk.ticket = ticket
        future = ticket.future
        self._background.add(future)
        future.add_done_callback(lambda done: self._chunk_written(chunk, done))

    def _chunk_written(self, chunk: _Chunk, done: asyncio.Future[AppendResult]) -> None:
        self._background.discard(done)
        if chunk.settled or done.cancelled():
            return  # taken back (dropped), or already accounted by an exit without a loop
        self._finish_chunk(chunk)
        self._record_stored(_Bodies(chunk.record), done.result(), "")

    def _finish_chunk(self, chunk: _Chunk) -> None:
        """The chunk leaves the overflow (its signals are about to be accounted)."""
        chunk.settled = True
        with contextlib.suppress(ValueError):
            self._chunks.remove(chunk)
        self._chunked -= len(chunk.received_at)
        self._overflow_bytes -= chunk.size

    def _drop_oldest_overflow(self) -> bool:
        """Drop the oldest overflow chunk that can still be taken back; False when none can."""
        for chunk in self._chunks:
            ticket = chunk.ticket
            if ticket is not None and ticket.taken:
                continue  # being written (never taken back): a read of a bool is enough
            if ticket is None or self.spool is None or self.spool.withdraw(ticket):
                with contextlib.suppress(ValueError):
                    self._waiting.remove(chunk)
                self._finish_chunk(chunk)
                self.drop(Batch(chunk.bodies(), chunk.received_at, -1), "queue_full")
                return True
        return False

    def _start_overflow_writer(self) -> None:
        if self._overflow_task is None or self._overflow_task.done():
            self._overflow_task = asyncio.ensure_future(self._write_waiting())
            self._background.add(self._overflow_task)
            self._overflow_task.add_done_callback(self._background.discard)

    async def _write_waiting(self) -> None:
        """Chunks sealed before the spool had opened: hand them over once it has."""
        spool = await self.usable()
        waiting = self._waiting
        while waiting:
            chunk = waiting.popleft()
            if spool is None:
                self._finish_chunk(chunk)
                self.drop(Batch(chunk.bodies(), chunk.received_at, -1), "queue_full")
            else:
                self._hand_over(spool, chunk, asyncio.get_running_loop())

    async def wait_for_overflow_room(self, timeout: float) -> None:
        """For ``await signal()``: while the spool writer is behind, wait (bounded) for it.

        Awaiting callers then slow down to the disk's pace instead of losing signals; callers
        that cannot wait (``signal_nowait()``) drop the oldest overflow as ``queue_full``.
        """
        if not self._chunks or (
            self.overflow_depth < AWAITED_OVERFLOW and not self._overflow_full(1)
        ):
            return
        # The oldest chunk: its write, or the writer waiting for the spool to open.
        ticket = self._chunks[0].ticket
        waited: asyncio.Future[Any] | None = None if ticket is None else ticket.future
        if waited is None:
            waited = self._overflow_task
        if waited is not None and not waited.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(waited), timeout)

    def _overflow_full(self, room: int, room_bytes: int = 0) -> bool:
        """True when the overflow leaves less than ``room`` signals (or ``room_bytes``) below
        its bound."""
        depth = self.overflow_depth
        return depth > OVERFLOW_BUFFER - room or (
            depth > 1 and self._overflow_bytes > OVERFLOW_BYTES - room_bytes
        )

    def take_overflow(self) -> Batch:
        """Every overflow signal still in memory, taken out (for an exit without a loop).

        Chunks the spool's thread had already begun writing are waited for (bounded) and
        accounted here; those it could not finish in time are returned too (written again:
        at least once).
        """
        bodies: list[bytes] = []
        received: list[float] = []
        spool = self.spool
        for chunk in list(self._chunks):
            ticket = chunk.ticket
            if ticket is not None and spool is not None and not spool.withdraw(ticket):
                done = ticket.done
                if done is not None and done.wait(_EXIT_WAIT) and ticket.outcome is not None:
                    self._finish_chunk(chunk)
                    self._record_stored(_Bodies(chunk.record), ticket.outcome, "")
                    continue
            self._finish_chunk(chunk)
            bodies += chunk.bodies()
            received += chunk.received_at
        self._waiting.clear()
        app_id = self.config.app_id
        for signal in self._gather:
            bodies.append(encode_signal(signal, app_id))
            received.append(signal.received_at)
        self._gather = []
        self._overflow_bytes = 0
        return Batch(bodies, received, -1)

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
        return result.stored, result.failed, result.evicted + result.rejected

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
            for batch in ready:
                self._settle_recovered(spool, batch, handed_back=True)

    def _claim_size(self, sender: Sender) -> int:
        """Batches per claim: one while probing, else enough to keep every slot busy."""
        if not sender.healthy:
            return 1
        return max(_CLAIM_BATCHES, self.config.max_concurrent_requests)

    async def _claim(self, spool: Spool, sender: Sender, budget: int) -> list[Batch]:
        """One transaction: up to :meth:`_claim_size` batches of spooled signals."""
        claims = await spool.claim_batches(self._claim_size(sender), self.config.batch_size, budget)
        self.accounting.record_dropped("expired", claims[0].expired, from_spool=True)
        # Damaged on disk (did not decompress): the spool deleted them and logged it.
        self.accounting.record_dropped("spool_error", claims[0].damaged, from_spool=True)
        batches = []
        for claim in claims:
            batches += self._recovered_batches(claim, budget)
        return batches

    def _recovered_batches(self, claim: ClaimResult, budget: int) -> list[Batch]:
        """The claimed records as batches: usually one (a chunk is one batch already); a
        claim that does not fit this client's batches (written with other settings) is cut
        per signal. Every record's signals are counted in ``_held`` until final."""
        limit = self.config.batch_size
        held = self._held
        sizes = claim.sizes or (None,) * len(claim.records)
        for (record_id, _), packed in zip(claim.records, sizes, strict=True):
            held[record_id] = [1 if packed is None else len(packed) // 4, 0]
        if len(sizes) == 1 and sizes[0] is not None:
            # The common case: one chunk, one batch, its bodies sliced out of the record.
            ((record_id, body),) = claim.records
            bodies = split_chunk(body, sizes[0])
            if len(bodies) <= limit and len(body) <= budget:
                return [self._recovered(bodies, [record_id] * len(bodies))]
        batches = []
        bodies = []
        ids: list[int | None] = []
        size = 0
        for (record_id, body), packed in zip(claim.records, sizes, strict=True):
            for part in split_chunk(body, packed):
                if bodies and (len(bodies) >= limit or size + len(part) + 1 > budget):
                    batches.append(self._recovered(bodies, ids))
                    bodies, ids, size = [], [], 0
                bodies.append(part)
                ids.append(record_id)
                size += len(part) + 1
        if bodies:
            batches.append(self._recovered(bodies, ids))
        return batches

    @staticmethod
    def _recovered(bodies: list[bytes], ids: list[int | None]) -> Batch:
        return Batch(bodies, [0.0] * len(bodies), RECOVERED_SEQ, ids, recovered=True)

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
        start, or they are sent again. Overflow still being gathered is handed over first.
        """
        self._seal()
        self._write_deferred()
        self._send_acks()
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)
        spool = self.spool
        if spool is not None and not spool.closed and not spool.disabled:
            # Acks are write-behind (queued, not yet committed): wait until the spool's thread
            # has committed everything queued so far.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(spool.barrier(), max(end - loop.time(), 0.01))

    async def close(self, end: float) -> None:
        """At close, by loop time ``end``: finish background writes, drop what the disk could
        not take in time, read the last figures and close the spool."""
        loop = asyncio.get_running_loop()
        self._seal()
        self._write_deferred()
        self._send_acks()
        if self._background:
            await asyncio.wait(list(self._background), timeout=max(end - loop.time(), 0.05))
        spool = self.spool
        for chunk in list(self._chunks):  # the disk was too slow for the close budget
            ticket = chunk.ticket
            if ticket is None or spool is None or spool.withdraw(ticket):
                self._finish_chunk(chunk)
                self.drop(Batch(chunk.bodies(), chunk.received_at, -1), "shutdown")
            # else: being written; the spool's close below waits for it, and its result
            # reaches the books before that close returns.
        self._waiting.clear()
        # The spool may still be opening (a very short-lived client): wait, then close it, so
        # its thread never outlives the client.
        spool = None if self._opening is None else await asyncio.shield(self._opening)
        if spool is not None:
            if not spool.disabled and not spool.closed:
                await self._read_figures(spool)
            await spool.close()
