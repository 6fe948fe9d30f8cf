"""Accounting: where every accepted signal ended up, and how the user sees it.

Each signal the client accepts ends in exactly one bucket: **sent**, **spooled** (left memory
for the on-disk spool), or **dropped** with a named reason; until then it is pending (queued or
in flight). So at any moment::

    enqueued == sent + spooled + sum(dropped.values()) + pending

What happens to a signal after it reached the spool is counted apart, so the balance above
holds: signals read back from the spool and delivered are counted in ``recovered``, and those
given up there (``expired``, ``spool_full``, or refused by the server when resent) in
``spool_dropped``. A spool is shared by processes, so these also count other processes'
signals.

One :class:`Accounting` object per client owns the counters, the ``on_drop``/``on_error``
callbacks and the rate-limited warnings, so every part of the pipeline reports the same way.
It is the ledger: every change of a signal's state is one of its ``record_*`` calls, made in
the same step (no ``await`` between) as the signal leaves the place that held it, so the
balance holds at every ``await``. Nothing else adds to these counters, the exit hook included.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, get_args

import attrs

__all__ = [
    "DROP_REASONS",
    "Accounting",
    "DropReason",
    "FlushResult",
    "LastError",
    "RateLimitedLog",
    "Stats",
]

log = logging.getLogger("telemetrydeck_async")

DropReason = Literal[
    "queue_full",
    "retries_exhausted",
    "oversize",
    "rejected",
    "permanent_error",
    "shutdown",
    "expired",
    "spool_full",
    "spool_error",
    "before_send",
]
#: Every reason a signal can be dropped for, as it appears in ``stats.dropped`` and ``on_drop``.
DROP_REASONS: Final[tuple[DropReason, ...]] = get_args(DropReason)

_DROP_EXPLANATIONS: Final[Mapping[str, str]] = {
    "queue_full": "the in-memory queue was full (raise max_queue_size or set spool_dir)",
    "retries_exhausted": "the retry deadline passed (set spool_dir to keep them on disk)",
    "oversize": "the server refused a single signal as too large (HTTP 413)",
    "rejected": "the server refused the signal as invalid (HTTP 400/422)",
    "permanent_error": "the server answered with a status that retrying cannot fix",
    "shutdown": "the client closed before they could be sent (set spool_dir to keep them)",
    "expired": "they waited in the spool longer than spool_max_age",
    "spool_full": "the spool was full (spool_max_bytes, or its disk); the oldest were dropped",
    "spool_error": "the spool could not write them to disk",
    "before_send": "the before_send hook returned None for them",
}
#: Reasons the application chose: counted, passed to on_drop, logged at DEBUG only.
_CHOSEN: Final = frozenset({"before_send"})


@attrs.frozen
class LastError:
    """The most recent error the background task handled: its class name, message and time."""

    type: str
    message: str
    at: float


@attrs.frozen(kw_only=True)
class Stats:
    """A snapshot of the client's counters (see the module docstring for how they add up).

    Attributes:
        enqueued: signals accepted by ``signal()`` / ``signal_nowait()``.
        sent: of those, delivered with a 2xx answer.
        batches_sent: requests answered with a 2xx.
        retried_requests: requests that failed and were tried again.
        spooled: signals that left memory for the on-disk spool.
        recovered: signals read back from the spool and delivered.
        dropped: signals given up, by reason (see ``DROP_REASONS``).
        queue_depth: signals waiting in memory.
        in_flight: signals in requests not yet answered (including backoff waits).
        parked: signals held while the endpoint refuses the app ID or namespace.
        last_error: the latest delivery or spool error, or None.
        spool_dropped: signals given up after they reached the spool, by reason.
        spool_records: records in the spool at its last reading (None without a spool).
        spool_bytes: bytes of signal bodies in the spool at its last reading.
    """

    enqueued: int
    sent: int
    batches_sent: int
    retried_requests: int
    spooled: int
    recovered: int
    dropped: Mapping[str, int]
    queue_depth: int
    in_flight: int
    parked: int
    last_error: LastError | None
    spool_dropped: Mapping[str, int] = attrs.field(factory=dict)
    spool_records: int | None = None
    spool_bytes: int | None = None

    @property
    def dropped_total(self) -> int:
        """All dropped signals, whatever the reason."""
        return sum(self.dropped.values())

    @property
    def pending(self) -> int:
        """Signals accepted but not yet sent, spooled or dropped."""
        return self.queue_depth + self.in_flight + self.parked


@attrs.frozen(kw_only=True)
class FlushResult:
    """What a ``flush()`` or ``aclose()`` accounted for while it ran.

    ``pending`` is what was still in memory when it returned (nonzero only on timeout, or while
    the endpoint refuses the app ID and no spool is configured).
    """

    sent: int
    spooled: int
    dropped: Mapping[str, int]
    pending: int

    @property
    def dropped_total(self) -> int:
        """All dropped signals, whatever the reason."""
        return sum(self.dropped.values())


@attrs.define
class RateLimitedLog:
    """Logs the same warning at most once per ``interval`` seconds, counting what it held back.

    Keyed by a short reason, so a flood of one problem cannot drown out another. Safe to call
    from several threads (the spool's thread reports through one too).
    """

    interval: float = 60.0
    _last: dict[str, float] = attrs.field(factory=dict)
    _suppressed: Counter[str] = attrs.field(factory=Counter)
    _clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False)

    def log(
        self,
        level: int,
        key: str,
        msg: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> None:
        """Log ``msg % args`` unless ``key`` was logged within the interval."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] += 1
                return
            self._last[key] = now
            held = self._suppressed.pop(key, 0)
        if held:
            msg += " (%d similar messages suppressed in the last %.0f s)"
            args = (*args, held, self.interval)
        log.log(level, msg, *args, exc_info=exc_info)


@attrs.define
class Accounting:
    """The counters and the reporting paths shared by the whole pipeline of one client."""

    on_drop: Callable[[Sequence[Mapping[str, Any]], str], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    enqueued: int = 0
    sent: int = 0
    batches_sent: int = 0
    retried_requests: int = 0
    spooled: int = 0
    recovered: int = 0
    dropped: Counter[str] = attrs.field(factory=Counter)
    spool_dropped: Counter[str] = attrs.field(factory=Counter)
    spool_records: int | None = None
    spool_bytes: int | None = None
    last_error: LastError | None = None
    warnings: RateLimitedLog = attrs.field(factory=RateLimitedLog)

    # Every change of a signal's state goes through one of the record_* methods below; no
    # other module adds to these counters, so the balance in the module docstring is kept in
    # one place (the exit hook included).

    def record_enqueued(self, count: int = 1) -> None:
        """``count`` signals were accepted by ``signal()`` and friends (now pending)."""
        self.enqueued += count

    def record_spooled(self, count: int) -> None:
        """``count`` pending signals left memory for the on-disk spool."""
        self.spooled += count

    def record_stored(
        self, bodies: Sequence[bytes], stored: int, failed: int, evicted: int, detail: str = ""
    ) -> None:
        """The outcome of one write of the pending signals ``bodies`` to the spool.

        ``stored`` of them are spooled; ``failed`` could not be written (dropped as
        ``spool_error``). ``evicted`` records were deleted to stay within the spool's size:
        those of this very write that did not fit (its oldest, the first ones given) are
        dropped as ``spool_full``; the rest had reached the spool before and are counted in
        ``spool_dropped``. So every signal given ends in exactly one bucket.
        """
        self.record_spooled(stored)
        self.record_dropped("spool_error", failed, lambda: decode_bodies(bodies[:failed]), detail)
        own = max(0, min(len(bodies) - stored - failed, evicted))
        self.record_dropped("spool_full", own, lambda: decode_bodies(bodies[:own]), detail)
        self.record_dropped("spool_full", evicted - own, from_spool=True)

    def record_retry(self) -> None:
        """A request failed and will be tried again."""
        self.retried_requests += 1

    def record_spool_figures(self, records: int | None, size: int | None) -> None:
        """The spool's size at its last reading (not a signal's state: for ``stats``)."""
        self.spool_records = records
        self.spool_bytes = size

    def record_sent(self, count: int, *, recovered: bool = False) -> None:
        """A batch of ``count`` signals was answered with a 2xx."""
        self.batches_sent += 1
        if recovered:
            self.recovered += count
        else:
            self.sent += count

    def record_dropped(
        self,
        reason: DropReason,
        count: int,
        bodies: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
        detail: str = "",
        *,
        from_spool: bool = False,
    ) -> None:
        """``count`` signals were given up for ``reason``; warn (rate-limited) and call on_drop.

        ``bodies`` builds the dropped signals for ``on_drop`` only when a callback is set.
        ``from_spool``: they had already reached the spool (counted in ``spool_dropped``).
        """
        if count <= 0:
            return
        (self.spool_dropped if from_spool else self.dropped)[reason] += count
        self.warnings.log(
            logging.DEBUG if reason in _CHOSEN else logging.WARNING,
            f"drop:{reason}",
            "dropped %d signal(s), reason %s: %s%s",
            count,
            reason,
            _DROP_EXPLANATIONS.get(reason, reason),
            f" ({detail})" if detail else "",
        )
        if self.on_drop is not None and bodies is not None:
            try:
                self.on_drop(bodies(), reason)
            except Exception:
                log.warning("the on_drop callback raised; ignoring it", exc_info=True)

    def record_error(self, exc: BaseException) -> None:
        """A delivery or spool error was handled in the background."""
        self.last_error = LastError(type(exc).__name__, str(exc)[:300], time.time())
        if self.on_error is not None:
            try:
                self.on_error(exc)
            except Exception:
                log.warning("the on_error callback raised; ignoring it", exc_info=True)

    def snapshot(self, *, queue_depth: int, in_flight: int, parked: int) -> Stats:
        """A frozen copy of the counters, with the pipeline's current depths."""
        return Stats(
            enqueued=self.enqueued,
            sent=self.sent,
            batches_sent=self.batches_sent,
            retried_requests=self.retried_requests,
            spooled=self.spooled,
            recovered=self.recovered,
            dropped=dict(self.dropped),
            queue_depth=queue_depth,
            in_flight=in_flight,
            parked=parked,
            last_error=self.last_error,
            spool_dropped=dict(self.spool_dropped),
            spool_records=self.spool_records,
            spool_bytes=self.spool_bytes,
        )


def decode_bodies(bodies: Sequence[bytes]) -> list[dict[str, Any]]:
    """Encoded signals back to JSON objects, for ``on_drop``; undecodable ones are skipped."""
    out: list[dict[str, Any]] = []
    for body in bodies:
        try:
            out.append(json.loads(body))
        except ValueError:
            continue
    return out
