"""The bounded in-memory queue and batch assembly. No I/O happens here.

``put()`` is on the caller's hot path: it appends the signal's bytes (encoded as the client
built it, see ``Signal.body``) and its time to the queue and, on the two transitions the
flusher cares about (the queue stops being empty; a full batch is ready), sets an event. No
task, future or timer is created per signal. Queuing bytes, rather than signals to encode
when a batch is cut, keeps the queue free of objects the garbage collector tracks: a burst
from code that never yields fills it with bytes and floats, which the collector never scans,
instead of tuples holding dicts, which every young collection scanned again until they were
sent. ``take()`` then only cuts a batch at ``batch_size`` signals or ``max_batch_bytes``
bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import attrs

from ._signal import Signal, encode_signal

__all__ = ["Batch", "Batcher", "batch_budget"]


def batch_budget(max_batch_bytes: int, signals: int = 0) -> int:
    """Bytes left for signal bodies in one request of at most ``max_batch_bytes``.

    The body is a JSON array: two bytes of brackets, and a comma between signals. With
    ``signals`` given, the commas of that many signals are taken off too (one more than
    needed, which keeps the figure safe for any count up to ``signals``); without, the caller
    adds one per signal after the first as it goes. The one place this rule lives.
    """
    return max_batch_bytes - 2 - signals


@attrs.define(eq=False)
class Batch:
    """Encoded signals bound for one request.

    ``seq`` is the position of the first signal in the client's stream (for ``flush()``);
    ``spool_ids`` are the spool record ids, one per signal (None for a signal not on disk; the
    signals of one recovered chunk repeat its id), when
    some signals are also on disk (recovered from the spool, or written ahead with durability
    "always"); ``recovered`` marks a batch read back from the spool.
    """

    bodies: list[bytes]
    #: Each signal's Unix time (0.0 for a signal read back from the spool).
    received_at: list[float]
    seq: int = 0
    spool_ids: list[int | None] | None = None
    recovered: bool = False

    def written_ids(self) -> list[int]:
        """The spool record ids of the signals that are on disk, each once (the signals of a
        recovered chunk share their record's id)."""
        return [i for i in dict.fromkeys(self.spool_ids or ()) if i is not None]

    def not_written(self) -> Batch:
        """The part of this batch that is not on disk (all of it, when nothing was written)."""
        ids = self.spool_ids
        if ids is None:
            return self
        keep = [n for n, i in enumerate(ids) if i is None]
        return Batch([self.bodies[n] for n in keep], [self.received_at[n] for n in keep], self.seq)

    def __len__(self) -> int:
        return len(self.bodies)

    def payload(self) -> bytes:
        """The request body: a JSON array of the encoded signals."""
        return b"[" + b",".join(self.bodies) + b"]"

    def split(self) -> tuple[Batch, Batch]:
        """Two halves, each keeping its signals' order, seq and spool ids."""
        mid = len(self.bodies) // 2
        ids = self.spool_ids
        first = Batch(
            self.bodies[:mid],
            self.received_at[:mid],
            self.seq,
            None if ids is None else ids[:mid],
            self.recovered,
        )
        second = Batch(
            self.bodies[mid:],
            self.received_at[mid:],
            self.seq + mid,
            None if ids is None else ids[mid:],
            self.recovered,
        )
        return first, second


@attrs.define(eq=False)
class Batcher:
    """A bounded FIFO of encoded signals and the cutting of it into batches.

    ``put_total`` and ``taken_total`` count signals in and out over the client's life; the
    flusher compares them with a ``flush()`` target to know when everything before it left.
    Only ``taken_total`` is kept: what was put is what was taken plus what waits, so ``put()``
    has one counter less to keep on every call.
    """

    app_id: str
    batch_size: int
    max_batch_bytes: int
    max_queue_size: int
    #: Set when the queue becomes non-empty or a full batch is ready: wakes the flusher.
    wakeup: asyncio.Event = attrs.field(factory=asyncio.Event)
    #: Set while there is room in the queue: wakes callers waiting in ``await signal()``.
    space: asyncio.Event = attrs.field(factory=asyncio.Event)
    taken_total: int = 0
    # The queued signals' bodies and times, side by side: two deques of objects the garbage
    # collector does not track, where a deque of (body, time) pairs would add a tracked
    # tuple per signal.
    _bodies: deque[bytes] = attrs.field(factory=deque)
    _times: deque[float] = attrs.field(factory=deque)
    # Spool record ids of queued signals written ahead (durability "always"), by the signal's
    # position in the stream (put_total when it was queued): empty otherwise, so the common
    # path pays one truth test per batch.
    _spool_ids: dict[int, int] = attrs.field(factory=dict)
    # The queue lengths before a put at which an event is due (the queue stops being empty, a
    # batch fills, the queue fills): one set lookup per put instead of three comparisons.
    _marks: frozenset[int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.space.set()
        self._marks = frozenset({0, self.batch_size - 1, self.max_queue_size - 1})

    @property
    def put_total(self) -> int:
        """Signals put in the queue over the client's life."""
        return self.taken_total + len(self._bodies)

    def __len__(self) -> int:
        return len(self._bodies)

    def put(self, signal: Signal, spool_id: int | None = None) -> bool:
        """Encode and append ``signal``; False (and nothing appended) when the queue is full.

        ``spool_id``: the signal's record in the spool when it was written ahead.
        """
        bodies = self._bodies
        size = len(bodies)
        if size >= self.max_queue_size:
            self.space.clear()
            return False
        body = signal.body  # encoded as the client built it: encode_signal, without a call
        bodies.append(encode_signal(signal, self.app_id) if body is None else body)
        self._times.append(signal.received_at)
        if spool_id is not None:
            self._spool_ids[self.taken_total + size] = spool_id  # its position in the stream
        if size in self._marks:
            if size == 0 or size + 1 == self.batch_size:
                self.wakeup.set()
            if size + 1 == self.max_queue_size:
                self.space.clear()  # the next await signal() waits for room before it tries
        return True

    def full_batch_ready(self) -> bool:
        """True when at least ``batch_size`` signals wait."""
        return len(self._bodies) >= self.batch_size

    def oldest_age(self, now: float | None = None) -> float:
        """Seconds since the oldest waiting signal was created (0 when empty)."""
        times = self._times
        if not times:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - times[0])

    def take(self) -> Batch | None:
        """Cut the next batch (up to ``batch_size`` signals and ``max_batch_bytes`` bytes)."""
        queue = self._bodies
        count = min(len(queue), self.batch_size)
        if not count:
            return None
        pop = queue.popleft
        bodies = [pop() for _ in range(count)]
        # The brackets and a comma between signals; past the byte limit (large signals), the
        # ones that do not fit go back to the front of the queue.
        if sum(map(len, bodies)) > batch_budget(self.max_batch_bytes, count - 1):
            count = _fitting(bodies, self.max_batch_bytes)
            queue.extendleft(reversed(bodies[count:]))
            del bodies[count:]
        pop_time = self._times.popleft
        times = [pop_time() for _ in range(count)]
        seq = self.taken_total
        self.taken_total = seq + count
        written = self._spool_ids
        ids: list[int | None] | None = None
        if written:
            ids = [written.pop(n, None) for n in range(seq, seq + count)]
            if not any(i is not None for i in ids):
                ids = None
        if len(queue) < self.max_queue_size:
            self.space.set()
        return Batch(bodies, times, seq, ids)

    def drain(self) -> list[Batch]:
        """Everything still queued, as batches (used at shutdown to spool or account it)."""
        batches = []
        while (batch := self.take()) is not None:
            batches.append(batch)
        return batches


def _fitting(bodies: list[bytes], max_batch_bytes: int) -> int:
    """How many of ``bodies``, from the first, fit in one request of ``max_batch_bytes``.

    At least one: a lone signal that does not fit is refused before it is queued.
    """
    budget = batch_budget(max_batch_bytes)
    size = len(bodies[0])
    count = 1
    for body in bodies[1:]:
        size += len(body) + 1
        if size > budget:
            break
        count += 1
    return count
