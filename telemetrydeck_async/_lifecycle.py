"""Process lifecycle: interpreter exit, ``fork()`` and OS signals.

Three hooks keep signals from being lost or sent twice when the process, not the client, ends:

* **exit** -- one ``atexit`` handler per process, registered when this module is imported. A
  client that was started but never closed holds an :class:`ExitTicket`. At exit, for each
  ticket whose event loop is gone (closed, or no longer running), what is still in memory is
  written to the spool *synchronously and without network I/O* (so the next run sends it), or,
  without a spool, dropped with reason ``shutdown`` and one WARNING saying how many were lost.
  A loop still running in another (daemon) thread is asked to run a bounded close instead.
* **fork** -- ``os.register_at_fork(after_in_child=...)``: in a child process every client
  forgets what it inherited (queue, background task, HTTP session, loop binding, spool
  handle, exit tickets) and starts over with a new session id. The parent alone sends what it
  had queued, so nothing is sent twice. The inherited objects are kept referenced, never
  closed: closing an inherited socket or event loop from the child would unregister the
  parent's file descriptors from the ``epoll`` set the two processes share.
* **OS signals** -- :class:`SignalHandlers`, behind ``TelemetryClient.install_signal_handlers``:
  SIGTERM/SIGINT run a graceful ``aclose()``, then the signal's previous behaviour.

This module never imports the client at runtime; the client calls in.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from ._batcher import Batch
from ._stats import FlushResult, decode_bodies

if TYPE_CHECKING:
    from ._client import TelemetryClient
    from ._flusher import Flusher
    from ._spool import AppendResult, SpoolRecord

__all__ = [
    "DEFAULT_SIGNALS",
    "ExitTicket",
    "SignalHandlers",
    "closed",
    "finish_at_exit",
    "keep_inherited",
    "opened",
    "salvage",
    "track",
]

log = logging.getLogger("telemetrydeck_async")

#: What ``install_signal_handlers()`` handles by default: a container's stop, and Ctrl-C.
DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)

#: Every client alive in this process, for the fork hook. Weak: tracking keeps nothing alive.
_clients: weakref.WeakSet[TelemetryClient] = weakref.WeakSet()
#: Started, not yet closed clients' pipelines, for the exit hook. Strong on purpose: a client
#: collected without aclose() leaves its flusher behind, and what it holds must not vanish.
_open: set[ExitTicket] = set()
#: Objects inherited from the parent process by a forked child: referenced until the child
#: exits so their finalizers never run here (see the module docstring).
_inherited: list[object] = []
_lock = threading.Lock()


@runtime_checkable
class SyncAppendable(Protocol):
    """The part of ``_spool.Spool`` the exit hook uses: a blocking append on its own connection."""

    def append_sync(self, records: Sequence[SpoolRecord]) -> AppendResult:
        """Store records pending, blocking; safe without an event loop."""


@attrs.define(eq=False)
class ExitTicket:
    """A started, unclosed client's pipeline, as the exit hook needs it.

    It holds the flusher (and through it the batcher, accounting, config and spool), not the
    client, so a client garbage-collected without ``aclose()`` still has its signals saved.
    """

    flusher: Flusher
    loop: asyncio.AbstractEventLoop
    #: Told the outcome when the exit hook finished the client off (if it is still alive).
    on_salvaged: weakref.WeakMethod[Callable[[FlushResult], None]]


# ------------------------------------------------------------------------------ registration


def track(client: TelemetryClient) -> None:
    """Remember ``client`` for the fork hook (weakly)."""
    with _lock:
        _clients.add(client)


def opened(
    flusher: Flusher,
    loop: asyncio.AbstractEventLoop,
    on_salvaged: Callable[[FlushResult], None],
) -> ExitTicket:
    """A client bound ``loop`` and started ``flusher``: guard it at interpreter exit."""
    ticket = ExitTicket(flusher, loop, weakref.WeakMethod(on_salvaged))
    with _lock:
        # Forget clients left unclosed on loops that have ended with nothing in memory: there
        # is nothing to save at exit, and holding them would keep their spool threads alive.
        _open.difference_update([t for t in _open if t.loop.is_closed() and _empty(t.flusher)])
        _open.add(ticket)
    return ticket


def _empty(flusher: Flusher) -> bool:
    return not flusher.batcher and not flusher.in_flight and not flusher.parked


def closed(ticket: ExitTicket | None) -> None:
    """The client closed (or was salvaged): the exit hook has nothing to do for it."""
    if ticket is not None:
        with _lock:
            _open.discard(ticket)


def keep_inherited(*objects: object) -> None:
    """Keep objects a forked child inherited alive, so their finalizers never run there."""
    _inherited.extend(o for o in objects if o is not None)


# ------------------------------------------------------------------------------ salvage


def _loop_gone(loop: asyncio.AbstractEventLoop) -> bool:
    return loop.is_closed() or not loop.is_running()


def salvage(flusher: Flusher, why: str) -> FlushResult:
    """Spool, or drop with reason ``shutdown``, everything ``flusher`` holds; no event loop.

    For a client whose loop is gone: nothing will run on it again, so the batches are taken
    out of memory directly and written with the spool's blocking ``append_sync`` (no network
    I/O). Every outcome goes through the client's ledger (``Accounting``), as on the loop:
    the same counters, rate-limited warnings and ``on_drop`` calls. ``why`` ends the log line
    (what the user should do differently).
    """
    accounting = flusher.accounting
    before = accounting.spooled, dict(accounting.dropped)
    batches = flusher.take_everything()
    # Signals already on disk (written ahead) stay there, claimed by this process; once it
    # has exited, the next process adopts them. Writing them again would send them twice.
    accounting.record_spooled(sum(len(b.written_ids()) for b in batches))
    in_memory = [rest for rest in (b.not_written() for b in batches) if rest.bodies]
    if in_memory and flusher.config.spool_dir is not None:
        bodies = [body for b in in_memory for body in b.bodies]
        stored, failed, evicted = spool_at_exit(flusher, in_memory)
        accounting.record_stored(bodies, stored, failed, evicted, why)
    elif in_memory:
        lost = [body for b in in_memory for body in b.bodies]
        accounting.record_dropped("shutdown", len(lost), lambda: decode_bodies(lost), why)
    spooled = accounting.spooled - before[0]
    dropped = {
        reason: n - before[1].get(reason, 0)
        for reason, n in accounting.dropped.items()
        if n != before[1].get(reason, 0)
    }
    if spooled:
        log.info("%d signal(s) written to the spool for the next run: %s", spooled, why)
    return FlushResult(sent=0, spooled=spooled, dropped=dropped, pending=0)


def spool_at_exit(flusher: Flusher, batches: Sequence[Batch]) -> tuple[int, int, int]:
    """Write ``batches`` to the spool, blocking; return (stored, failed, evicted).

    Uses the flusher's own spool (its ``append_sync``) when it has one open in this process;
    otherwise opens the configured spool directory just for this write.
    """
    from ._spool import SpoolRecord  # only when a spool is configured: sqlite3 stays unloaded

    records = [
        SpoolRecord(received_at=at, body=body)
        for batch in batches
        for body, at in zip(batch.bodies, batch.received_at, strict=True)
    ]
    spool = getattr(flusher, "spool", None)
    try:
        if isinstance(spool, SyncAppendable):
            result = spool.append_sync(records)
        else:
            result = _append_to_fresh_spool(flusher, records)
    except Exception:
        log.warning(
            "could not write %d signal(s) to the spool at exit", len(records), exc_info=True
        )
        return 0, len(records), 0
    return len(result.ids), result.failed, result.evicted + result.rejected


def _append_to_fresh_spool(flusher: Flusher, records: Sequence[SpoolRecord]) -> AppendResult:
    """Open the configured spool on a throwaway loop, append pending, close: disk only.

    The loop runs in a helper thread, because this may be called on a running loop (an
    ``aclose()`` on a new loop after the client's own one ended), where ``asyncio.run()`` is
    not allowed.
    """
    from ._spool import Destination, open_spool

    config = flusher.config
    directory = config.spool_dir
    assert directory is not None  # checked by the caller

    async def append() -> AppendResult:
        spool = await open_spool(
            directory,
            max_bytes=config.spool_max_bytes,
            max_age=config.spool_max_age,
            durability=config.durability,
            destination=Destination(config.endpoint_url, config.app_id),
        )
        try:
            return await spool.append(records)
        finally:
            await spool.close()

    outcome: list[AppendResult | BaseException] = []

    def run() -> None:
        try:
            outcome.append(asyncio.run(append()))
        except BaseException as exc:  # handed to the calling thread below
            outcome.append(exc)

    helper = threading.Thread(target=run, name="telemetrydeck-exit-spool")
    helper.start()
    helper.join()
    (result,) = outcome
    if isinstance(result, BaseException):
        raise result
    return result


def _close_on_other_thread(ticket: ExitTicket) -> None:
    """The loop still runs in another (daemon) thread: ask it for a bounded close."""
    flusher = ticket.flusher
    budget = flusher.config.close_timeout

    async def close() -> FlushResult:
        try:
            return await flusher.close(budget)
        finally:
            await flusher.transport.close()

    try:
        future = asyncio.run_coroutine_threadsafe(close(), ticket.loop)
        result = future.result(timeout=budget + 1.0)
    except Exception:
        log.warning("could not close a TelemetryClient at exit", exc_info=True)
        return
    _tell(ticket, result)


def _tell(ticket: ExitTicket, result: FlushResult) -> None:
    on_salvaged = ticket.on_salvaged()
    if on_salvaged is not None:
        on_salvaged(result)


def finish_at_exit(tickets: Iterable[ExitTicket]) -> None:
    """Finish off the clients behind ``tickets`` as the interpreter exits.

    A loop that is gone: salvage without network I/O. A loop still running in another thread:
    a bounded close on it. Never raises; each ticket is retired.
    """
    for ticket in tickets:
        closed(ticket)
        try:
            if _loop_gone(ticket.loop):
                result = salvage(
                    ticket.flusher,
                    "a TelemetryClient was still open when the interpreter exited; "
                    "use 'async with TelemetryClient(...)' or 'await client.aclose()'",
                )
                _tell(ticket, result)
            else:
                _close_on_other_thread(ticket)
        except Exception:
            log.warning("telemetrydeck-async exit hook failed for one client", exc_info=True)


def _at_exit() -> None:
    """atexit: finish off every client still open (see the module docstring)."""
    with _lock:
        tickets = list(_open)
    finish_at_exit(tickets)


# ------------------------------------------------------------------------------ fork


def _after_fork_in_child() -> None:
    """Reset every live client in a freshly forked child (see the module docstring)."""
    global _lock
    # Another thread of the parent may have held the lock at fork time: never wait on it here.
    _lock = threading.Lock()
    keep_inherited(*_open)
    _open.clear()
    for client in list(_clients):
        try:
            client._after_fork_in_child()
        except Exception:
            log.warning("could not reset a TelemetryClient after fork()", exc_info=True)


# ------------------------------------------------------------------------------ OS signals


@attrs.define(eq=False)
class SignalHandlers:
    """SIGTERM/SIGINT on one loop: a graceful close, then the signal's previous behaviour.

    The previous Python-level handler of each signal is remembered and put back before the
    signal is raised again, so the process ends as it would have without us: killed by
    SIGTERM under the default disposition, ``KeyboardInterrupt`` for SIGINT (through
    ``asyncio.run``'s own handler when it installed one). A second signal while the close
    runs skips the wait.
    """

    _close: Callable[[], Awaitable[object]]
    _loop: asyncio.AbstractEventLoop
    _previous: dict[int, Any] = attrs.field(factory=dict)
    _task: asyncio.Task[None] | None = None

    @property
    def signals(self) -> tuple[int, ...]:
        """The signal numbers handled now."""
        return tuple(self._previous)

    def install(self, signums: Iterable[int]) -> None:
        """Handle ``signums`` on the loop (idempotent per signal)."""
        for signum in signums:
            if signum in self._previous:
                continue
            previous = signal.getsignal(signum)
            self._loop.add_signal_handler(signum, self._on_signal, signum)
            self._previous[signum] = previous

    def uninstall(self) -> None:
        """Give every handled signal back its previous handler (idempotent)."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            with contextlib.suppress(Exception):
                if not self._loop.is_closed():
                    self._loop.remove_signal_handler(signum)
            if handler is not None:  # None: set outside Python; the default is what is left
                with contextlib.suppress(Exception):
                    signal.signal(signum, handler)

    def forget_after_fork(self) -> None:
        """In a forked child: restore the previous handlers without touching the parent's loop.

        The C-level wakeup fd still points into the parent's loop, so a signal delivered to the
        child would be handled by the parent: it is switched off (Python 3.12 does this itself).
        """
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            with contextlib.suppress(Exception):
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if previous and sys.version_info < (3, 12):
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._task is not None:
            log.warning("received %s again: exiting without waiting for the close", name)
            self.uninstall()
            signal.raise_signal(signum)
            return
        log.info("received %s: closing the TelemetryClient, then exiting", name)
        self._task = self._loop.create_task(self._close_then_raise(signum))

    async def _close_then_raise(self, signum: int) -> None:
        try:
            await self._close()
        except Exception:
            log.warning("closing the TelemetryClient on a signal failed", exc_info=True)
        finally:
            self.uninstall()
            signal.raise_signal(signum)


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
