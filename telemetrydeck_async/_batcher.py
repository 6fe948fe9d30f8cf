"""The bounded in-memory queue and batch assembly. No I/O happens here.

``put()`` is on the caller's hot path, so it only appends to a deque and, on the two transitions
the flusher cares about (the queue stops being empty; a full batch is ready), sets an event.
No task, future or timer is created per signal. Encoding happens in ``take()``, inside the
flusher, where a batch is cut at ``batch_size`` signals or ``max_batch_bytes`` bytes: with the
``fast`` extra a whole batch in one orjson call, else once per signal.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

import attrs

from ._signal import Signal, encode_batch, encode_signal, fast_encoding

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

    _bodies: list[bytes] | None = attrs.field(alias="bodies")
    _received_at: list[float] | None = attrs.field(alias="received_at")
    seq: int = 0
    spool_ids: list[int | None] | None = None
    recovered: bool = False
    # A batch cut from the queue and encoded whole (Batcher.take) keeps its signals and its
    # request body; its bodies and times are made from the signals on first use (a split, the
    # spool, on_drop), so a batch that is simply sent never makes them.
    _signals: Sequence[Signal] = attrs.field(default=(), kw_only=True, alias="signals")
    _app_id: str = attrs.field(default="", kw_only=True, alias="app_id")
    _payload: bytes | None = attrs.field(default=None, kw_only=True, alias="payload")

    @property
    def bodies(self) -> list[bytes]:
        """The encoded signals, in order."""
        bodies = self._bodies
        if bodies is None:
            app_id = self._app_id
            bodies = self._bodies = [encode_signal(signal, app_id) for signal in self._signals]
        return bodies

    @property
    def received_at(self) -> list[float]:
        """Each signal's Unix time (0.0 for a signal read back from the spool)."""
        times = self._received_at
        if times is None:
            times = self._received_at = [signal.received_at for signal in self._signals]
        return times

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
        bodies = self._bodies
        return len(self._signals) if bodies is None else len(bodies)

    def payload(self) -> bytes:
        """The request body: a JSON array of the encoded signals."""
        payload = self._payload
        if payload is None:
            return b"[" + b",".join(self.bodies) + b"]"
        return payload

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
    """A bounded FIFO of validated signals and the cutting of it into batches.

    ``put_total`` and ``taken_total`` count signals in and out over the client's life; the
    flusher compares them with a ``flush()`` target to know when everything before it left.
    """

    app_id: str
    batch_size: int
    max_batch_bytes: int
    max_queue_size: int
    #: Set when the queue becomes non-empty or a full batch is ready: wakes the flusher.
    wakeup: asyncio.Event = attrs.field(factory=asyncio.Event)
    #: Set while there is room in the queue: wakes callers waiting in ``await signal()``.
    space: asyncio.Event = attrs.field(factory=asyncio.Event)
    put_total: int = 0
    taken_total: int = 0
    _queue: deque[Signal] = attrs.field(factory=deque)
    # A signal encoded by take() that did not fit in the last batch: it leads the next one.
    _carry: tuple[bytes, float, int | None] | None = None
    # Spool record ids of queued signals written ahead (durability "always"), by id(signal):
    # empty otherwise, so the common path pays one truth test per batch.
    _spool_ids: dict[int, int] = attrs.field(factory=dict)
    # False after a batch encoded whole came out over max_batch_bytes: large signals are cut
    # one by one until a batch is cut by count again (each whole attempt costs an encode).
    _whole: bool = True

    def __attrs_post_init__(self) -> None:
        self.space.set()

    def __len__(self) -> int:
        return len(self._queue) + (self._carry is not None)

    def put(self, signal: Signal, spool_id: int | None = None) -> bool:
        """Append ``signal``; False (and nothing appended) when the queue is full.

        ``spool_id``: the signal's record in the spool when it was written ahead.
        """
        queue = self._queue
        size = len(queue)
        if size >= self.max_queue_size:
            self.space.clear()
            return False
        queue.append(signal)
        if spool_id is not None:
            self._spool_ids[id(signal)] = spool_id
        self.put_total += 1
        if size == 0 or size + 1 == self.batch_size:
            self.wakeup.set()
        if size + 1 >= self.max_queue_size:
            self.space.clear()  # the next await signal() waits for room before it tries
        return True

    def full_batch_ready(self) -> bool:
        """True when at least ``batch_size`` signals wait."""
        return len(self) >= self.batch_size

    def oldest_age(self, now: float | None = None) -> float:
        """Seconds since the oldest waiting signal was created (0 when empty)."""
        if self._carry is not None:
            oldest = self._carry[1]
        elif self._queue:
            oldest = self._queue[0].received_at
        else:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - oldest)

    def take(self) -> Batch | None:
        """Cut the next batch (up to ``batch_size`` signals and ``max_batch_bytes`` bytes)."""
        if not self:
            return None
        if self._whole and self._carry is None and not self._spool_ids and fast_encoding():
            batch = self._take_encoded()
            if batch is not None:
                return batch
        bodies: list[bytes] = []
        received: list[float] = []
        written = self._spool_ids
        ids: list[int | None] | None = None
        # The brackets; one comma per signal after the first, added below as signals join.
        budget = batch_budget(self.max_batch_bytes)
        size = 0
        seq = self.taken_total
        if self._carry is not None:
            body, at, carried_id = self._carry
            self._carry = None
            bodies.append(body)
            received.append(at)
            size = len(body)
            if carried_id is not None:
                ids = [carried_id]
        if written and ids is None:
            ids = [None] * len(bodies)
        queue = self._queue
        app_id = self.app_id
        limit = self.batch_size
        # Once per signal, on the loop: bound methods and a counter instead of len() calls.
        count = len(bodies)
        pop = queue.popleft
        add_body = bodies.append
        add_time = received.append
        encode = encode_signal
        while queue and count < limit:
            signal = pop()
            body = encode(signal, app_id)
            extra = len(body) + (1 if count else 0)
            spool_id = written.pop(id(signal), None) if written else None
            if count and size + extra > budget:
                self._carry = (body, signal.received_at, spool_id)
                break
            add_body(body)
            add_time(signal.received_at)
            if spool_id is not None and ids is None:
                ids = [None] * count
            if ids is not None:
                ids.append(spool_id)
            size += extra
            count += 1
        self.taken_total += count
        self._whole = self._carry is None
        if len(queue) < self.max_queue_size:
            self.space.set()
        return Batch(bodies, received, seq, ids)

    def _take_encoded(self) -> Batch | None:
        """The next batch encoded whole (:func:`encode_batch`); None to cut it signal by signal.

        Up to ``batch_size`` signals and one orjson call for all of them. When the body is
        over ``max_batch_bytes`` (or a value was refused), the signals go back to the front of
        the queue and the caller cuts the batch signal by signal, the size of each known.
        """
        queue = self._queue
        pop = queue.popleft
        signals = [pop() for _ in range(min(len(queue), self.batch_size))]
        payload = encode_batch(signals, self.app_id)
        if payload is None or len(payload) > self.max_batch_bytes:
            queue.extendleft(reversed(signals))
            self._whole = payload is None
            return None
        seq = self.taken_total
        self.taken_total = seq + len(signals)
        if len(queue) < self.max_queue_size:
            self.space.set()
        return Batch(None, None, seq, signals=signals, app_id=self.app_id, payload=payload)

    def drain(self) -> list[Batch]:
        """Everything still queued, as batches (used at shutdown to spool or account it)."""
        batches = []
        while (batch := self.take()) is not None:
            batches.append(batch)
        return batches
