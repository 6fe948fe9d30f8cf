"""Process lifecycle: interpreter exit, ``fork()`` and OS signals.

Three hooks keep signals from being lost or sent twice when the process, not the client, ends:

* **exit** -- one ``atexit`` handler per process, registered when this module is imported. A
  client that was started but never closed holds an :class:`ExitTicket`. At exit, for each
  ticket whose event loop is gone (closed, or no longer running), what is still in memory is
  written to the spool *synchronously and without network I/O* (so the next run sends it), or,
  without a spool, dropped with reason ``shutdown`` and one WARNING saying how many were lost.
  A loop still running in another (daemon) thread is asked to run a bounded close instead.
* **fork** -- ``os.register_at_fork(after_in_child=...)``: in a child process every client
  (through the hook it handed to :func:`track`) forgets what it inherited (queue, background
  task, HTTP session, loop binding, spool handle, exit tickets) and starts over with a new
  session id. The parent alone sends what it
  had queued, so nothing is sent twice. The inherited objects are kept referenced, never
  closed: closing an inherited socket or event loop from the child would unregister the
  parent's file descriptors from the ``epoll`` set the two processes share.
* **OS signals** -- :class:`SignalHandlers`, behind ``TelemetryClient.install_signal_handlers``:
  SIGTERM/SIGINT run a graceful ``aclose()``, then the signal's previous behaviour.

This module never imports the client, nor names its methods: a client hands in its own fork hook
(:func:`track`) and its pipeline (:class:`Pipeline`, which the flusher implements) when it starts.
At exit the pipeline is closed with the same two closes ``aclose()`` uses: ``close()`` on its own
loop, ``salvage_without_loop()`` once that loop is gone.
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
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

import attrs

from ._config import ClientConfig
from ._stats import FlushResult

__all__ = [
    "DEFAULT_SIGNALS",
    "ExitTicket",
    "Pipeline",
    "SignalHandlers",
    "closed",
    "finish_at_exit",
    "finish_without_loop",
    "keep_inherited",
    "opened",
    "track",
]

log = logging.getLogger("telemetrydeck_async")

_T = TypeVar("_T")

#: What ``install_signal_handlers()`` handles by default: a container's stop, and Ctrl-C.
DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)

#: Each live object's reset for a forked child, handed in by the object itself. Weak keys:
#: tracking keeps nothing alive, and a collected object's entry goes with it (one
#: ``os.register_at_fork`` per object, as OpenTelemetry's processors do, could never be
#: unregistered: a process making a client per job would grow that list without end).
_fork_hooks: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()
#: Started, not yet closed clients' pipelines, for the exit hook. Strong on purpose: a client
#: collected without aclose() leaves its flusher behind, and what it holds must not vanish.
_open: set[ExitTicket] = set()
#: Objects inherited from the parent process by a forked child: referenced until the child
#: exits so their finalizers never run here (see the module docstring).
_inherited: list[object] = []
_lock = threading.Lock()


class Pipeline(Protocol):
    """What the exit hook needs of a client's pipeline (``_flusher.Flusher`` implements it).

    The same two closes ``aclose()`` uses: one on the pipeline's own loop, one for a loop that
    is gone. Nothing else of the pipeline (its queue, deliveries, spool) is looked at here.
    """

    @property
    def config(self) -> ClientConfig:
        """The client's options (``close_timeout`` bounds a close at exit)."""

    @property
    def pending(self) -> int:
        """Signals of this process not yet sent, spooled or dropped."""

    async def close(self, timeout: float) -> FlushResult:
        """On the pipeline's loop: flush within ``timeout``, spool or drop the rest, stop."""

    def salvage_without_loop(self, why: str) -> FlushResult:
        """With the loop gone: spool, or drop with reason ``shutdown``, all that is left."""


@attrs.define(eq=False)
class ExitTicket:
    """A started, unclosed client's pipeline, as the exit hook needs it.

    It holds the pipeline (the flusher, and through it the batcher, ledger and spool), not
    the client, so a client garbage-collected without ``aclose()`` still has its signals saved.
    """

    pipeline: Pipeline
    loop: asyncio.AbstractEventLoop
    #: Told the outcome when the exit hook finished the client off (if it is still alive).
    on_salvaged: weakref.WeakMethod[Callable[[FlushResult], None]]


# ------------------------------------------------------------------------------ registration


def track(owner: _T, after_fork_in_child: Callable[[_T], None]) -> None:
    """Call ``after_fork_in_child(owner)`` in a forked child while ``owner`` lives (weakly)."""
    with _lock:
        _fork_hooks[owner] = after_fork_in_child


def opened(
    pipeline: Pipeline,
    loop: asyncio.AbstractEventLoop,
    on_salvaged: Callable[[FlushResult], None],
) -> ExitTicket:
    """A client bound ``loop`` and started ``pipeline``: guard it at interpreter exit."""
    ticket = ExitTicket(pipeline, loop, weakref.WeakMethod(on_salvaged))
    with _lock:
        # Forget clients left unclosed on loops that have ended with nothing in memory: there
        # is nothing to save at exit, and holding them would keep their spool threads alive.
        _open.difference_update([t for t in _open if t.loop.is_closed() and not t.pipeline.pending])
        _open.add(ticket)
    return ticket


def closed(ticket: ExitTicket | None) -> None:
    """The client closed (or was salvaged): the exit hook has nothing to do for it."""
    if ticket is not None:
        with _lock:
            _open.discard(ticket)


def keep_inherited(*objects: object) -> None:
    """Keep objects a forked child inherited alive, so their finalizers never run there."""
    _inherited.extend(o for o in objects if o is not None)


# ------------------------------------------------------------------------------ exit


def _loop_gone(loop: asyncio.AbstractEventLoop) -> bool:
    return loop.is_closed() or not loop.is_running()


def _close_on_other_thread(ticket: ExitTicket) -> None:
    """The loop still runs in another (daemon) thread: ask it for a bounded close."""
    budget = ticket.pipeline.config.close_timeout
    try:
        future = asyncio.run_coroutine_threadsafe(ticket.pipeline.close(budget), ticket.loop)
        result = future.result(timeout=budget + 1.0)
    except Exception:
        log.warning("could not close a TelemetryClient at exit", exc_info=True)
        return
    _tell(ticket, result)


def finish_without_loop(ticket: ExitTicket, why: str) -> FlushResult:
    """The close of a client whose loop is gone, for ``aclose()`` and the exit hook alike.

    The pipeline spools, or drops with reason ``shutdown``, what it still holds, without
    network I/O; then the ticket is retired and its client (if still alive) told the outcome.
    ``why`` ends the log lines (what the user should do differently).
    """
    result = ticket.pipeline.salvage_without_loop(why)
    closed(ticket)
    _tell(ticket, result)
    return result


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
                finish_without_loop(
                    ticket,
                    "a TelemetryClient was still open when the interpreter exited; "
                    "use 'async with TelemetryClient(...)' or 'await client.aclose()'",
                )
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
    """Run every live object's fork hook in a freshly forked child (see the module docstring)."""
    global _lock
    # Another thread of the parent may have held the lock at fork time: never wait on it here.
    _lock = threading.Lock()
    keep_inherited(*_open)
    _open.clear()
    for owner, after_fork_in_child in list(_fork_hooks.items()):
        try:
            after_fork_in_child(owner)
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
