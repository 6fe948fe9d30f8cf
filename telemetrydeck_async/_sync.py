"""The synchronous facade: :class:`SyncTelemetryClient`, for Django, Flask, Celery, CLIs, Lambda.

It is a thin, typed front for one :class:`~telemetrydeck_async.TelemetryClient`: the same
options, validation, batching, retries and spool. That client runs on an event loop which the
facade owns in one daemon thread, started on first use:

* ``signal()`` and the presets validate and build the signal in the caller's thread (a bad
  call raises there and queues nothing), then hand it to the loop with
  ``call_soon_threadsafe``: no network or disk wait. With ``durability="always"`` the caller
  waits, bounded, until the signal is on disk.
* **fork**: the facade remembers the pid that started the loop. A forked child (gunicorn
  ``--preload`` workers, ``multiprocessing`` with fork, Celery's prefork pool) finds the
  thread gone, and starts its own loop on first use; the async client's fork hook has already
  emptied what the child inherited, so the parent alone sends its queue.
* **exit**: an ``atexit`` hook of this module closes every facade with ``close()``, bounded
  by ``close_timeout``, before ``_lifecycle``'s hook runs (which then finds nothing left):
  daemon threads may still be calling ``signal()``, and each such call is either queued before
  the close or refused with ``ClientClosedError``, never left uncounted. At that point
  ``concurrent.futures`` refuses new work, and aiohttp resolves host names through the
  loop's default executor: the loop therefore gets an executor that runs such a call inline
  on the loop thread once the pool refuses (:class:`_ExitSafeExecutor`), so the close
  still reaches ``https://`` hosts by name, or spools what it cannot send.
* a child started by ``multiprocessing`` ends with ``os._exit()`` (no ``atexit``): the facade
  registers a ``multiprocessing`` finalizer there, which that exit does run.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import inspect
import logging
import math
import os
import ssl as _ssl
import sys
import threading
import uuid
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, Concatenate, Final, ParamSpec, TypeVar, overload

from . import _lifecycle
from ._client import TelemetryClient
from ._config import (
    DEFAULT_BASE_URL,
    BeforeSend,
    ClientConfig,
    Durability,
    OnDrop,
    OnError,
)
from ._presets import SESSION_STARTED, Duration, Presets
from ._retry import RetryPolicy
from ._signal import PayloadValue, Signal, check_optional_text
from ._stats import FlushResult, Stats
from .exceptions import ClientClosedError, WrongEventLoopError

__all__ = ["SyncTelemetryClient"]

log = logging.getLogger("telemetrydeck_async")

#: Extra seconds a caller waits on the loop beyond the operation's own bound, so the loop's
#: answer (not the caller's clock) decides the outcome whenever the loop is responsive.
_GRACE: Final = 5.0
#: How long starting the loop (and opening the spool) may take before the caller gives up.
_START_WAIT: Final = 15.0

_P = ParamSpec("_P")
_R = TypeVar("_R")
_T = TypeVar("_T")


class _ExitSafeExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor: a thread pool that still works during interpreter exit.

    After ``threading``'s exit hooks ran, every ``ThreadPoolExecutor`` refuses new work, and
    on Python 3.12 new threads are refused too. The only users of this executor are aiohttp's
    host-name lookups (and proxy settings lookups), each short: from then on they run inline
    on the loop thread, which at that point only has the final, bounded close to do.
    """

    def submit(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> concurrent.futures.Future[_T]:
        """Run ``fn`` in the pool, or inline once the interpreter is shutting down."""
        try:
            return super().submit(fn, *args, **kwargs)
        except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
            future: concurrent.futures.Future[_T] = concurrent.futures.Future()
            future.set_running_or_notify_cancel()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the awaiting coroutine
                future.set_exception(exc)
            return future


def _drive(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never suspends (a preset on :class:`_Emitter`) to its end."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]  # reason: StopIteration.value is Any
    coro.close()
    raise RuntimeError("a preset of SyncTelemetryClient suspended; this is a bug")


def _sync_preset(
    preset: Callable[Concatenate[Presets, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[SyncTelemetryClient, _P], _R]:
    """The synchronous twin of an async preset: same arguments, checks and wire output."""

    @functools.wraps(preset)
    def call(self: SyncTelemetryClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        # The preset's body validates and calls _Emitter._emit, which never suspends: the
        # coroutine finishes in this thread, on the first step.
        return _drive(preset(self._emitter, *args, **kwargs))

    return call


class _Emitter(Presets):
    """What the shared preset code calls back into, for a :class:`SyncTelemetryClient`."""

    def __init__(self, facade: SyncTelemetryClient) -> None:
        self._facade = facade

    async def _emit(self, signal_type: str, params: dict[str, PayloadValue], **fields: Any) -> None:
        # The facade never waits: awaited presets take the same path as the others.
        self._emit_nowait(signal_type, params, **fields)

    def _emit_nowait(
        self,
        signal_type: str,
        params: dict[str, PayloadValue],
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        float_value: float | None = None,
        test_mode: bool | None = None,
    ) -> None:
        self._facade._hand_over(
            signal_type, client_user, session_id, payload, float_value, test_mode, params
        )

    def _nowait_ready(self) -> bool:
        return self._facade._running() is not None


#: Every facade alive in this process, for the fork hook. Weak: tracking keeps nothing alive.
_facades: weakref.WeakSet[SyncTelemetryClient] = weakref.WeakSet()


class SyncTelemetryClient:
    """A synchronous client for the TelemetryDeck Ingest API v2, callable from any thread.

    For code that is not asyncio: Django and Flask views, gunicorn sync workers, Celery tasks,
    scripts, CLIs, AWS Lambda handlers. The options, their defaults and their validation are
    those of :class:`~telemetrydeck_async.TelemetryClient`, which does the work on an event loop
    this client runs in a daemon thread, started on first use::

        td = SyncTelemetryClient("APP-ID", namespace="com.example")
        td.signal("Checkout.Payment.completed", client_user="user-42")

    ``signal()`` returns without waiting for the network. Nothing needs closing by hand: at
    interpreter exit a bounded close (``close_timeout``) sends what is queued, or spools it.
    After ``fork()`` (gunicorn ``--preload``, ``multiprocessing``, Celery's prefork pool) the
    child starts its own loop on first use. Use it as a context manager, or call ``close()``,
    to close it earlier; ``flush()`` sends what is queued so far (bounded) and keeps it open.

    Args:
        app_id: the app ID; every other option is keyword-only and documented on
            :class:`~telemetrydeck_async.TelemetryClient`.
    """

    def __init__(
        self,
        app_id: str,
        *,
        namespace: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        salt: str = "",
        default_user: str | None = None,
        session_id: str | None = None,
        test_mode: bool = False,
        default_payload: Mapping[str, Any] | None = None,
        batch_size: int = 100,
        max_batch_bytes: int = 1024 * 1024,
        flush_interval: float = 5.0,
        max_queue_size: int = 50_000,
        request_timeout: float = 10.0,
        close_timeout: float = 10.0,
        max_concurrent_requests: int = 2,
        retry: RetryPolicy | None = None,
        spool_dir: str | None = None,
        durability: Durability = "spill",
        spool_max_bytes: int = 64 * 1024 * 1024,
        spool_max_age: float = 7 * 86400.0,
        on_drop: OnDrop | None = None,
        on_error: OnError | None = None,
        app_version: str | None = None,
        signal_prefix: str | None = None,
        payload_prefix: str | None = None,
        default_user_file: str | os.PathLike[str] | None = None,
        enabled: bool = True,
        proxy: str | None = None,
        ssl: str | os.PathLike[str] | _ssl.SSLContext | None = None,
        trust_env: bool = True,
        before_send: BeforeSend | None = None,
    ) -> None:
        # Every option reaches the async client by name: one validation, one set of defaults.
        options = {
            name: value for name, value in locals().items() if name not in ("self", "app_id")
        }
        self._client = TelemetryClient(app_id, **options)
        self._emitter = _Emitter(self)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        #: The process that started the loop: in any other (a forked child) it is gone.
        self._pid = -1
        self._closed = False
        self._close_result: FlushResult | None = None
        config = self._client.config
        self._write_ahead = config.spool_dir is not None and config.durability == "always"
        _facades.add(self)

    @classmethod
    def from_env(cls, **overrides: Any) -> SyncTelemetryClient:
        """A client configured from ``TELEMETRYDECK_*`` environment variables.

        Reads the same variables as :meth:`TelemetryClient.from_env
        <telemetrydeck_async.TelemetryClient.from_env>`; keyword arguments win over them.
        """
        # The async client's own reading of the environment, building this class: one
        # implementation of the variables, their parsing and the missing-app-id error.
        build: Callable[..., SyncTelemetryClient] = vars(TelemetryClient)["from_env"].__func__
        return build(cls, **overrides)

    # ----------------------------------------------------------------------------- properties

    @property
    def config(self) -> ClientConfig:
        """The validated options this client was built with."""
        return self._client.config

    @property
    def session_id(self) -> str:
        """The session id sent with signals that do not name their own."""
        return self._client.session_id

    @property
    def enabled(self) -> bool:
        """False when ``enabled=False`` or ``TELEMETRYDECK_DISABLED`` made this client a no-op."""
        return self._client.enabled

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called, or the exit hook closed the client."""
        return self._closed or self._client.closed

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters (see :class:`~telemetrydeck_async.Stats`)."""
        return self._client.stats

    # ----------------------------------------------------------------------------- the loop

    def _running(self) -> TelemetryClient | None:
        """The started async client of this process, or None for a disabled client.

        Starts the loop thread on first use in this process. Raises ``ClientClosedError``
        once closed.
        """
        if self._pid == os.getpid() and not self._closed and not self._client.closed:
            return self._client  # the fast path: started here, open
        if self.closed:
            raise ClientClosedError("this SyncTelemetryClient is closed; create a new one")
        if not self._client.enabled:
            return None
        with self._lock:
            # Checked again under the lock: a close() that ran meanwhile must not see a loop
            # started after it (nobody would close that one).
            if self._closed:
                raise ClientClosedError("this SyncTelemetryClient is closed; create a new one")
            if self._pid != os.getpid():
                self._start()
        return self._client

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_default_executor(_ExitSafeExecutor(thread_name_prefix="telemetrydeck-dns"))
        thread = threading.Thread(
            target=_run_loop, args=(loop,), name="telemetrydeck-sync", daemon=True
        )
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._client.start(), loop).result(_START_WAIT)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            raise
        self._loop, self._thread = loop, thread
        self._pid = os.getpid()
        log.debug("SyncTelemetryClient started its loop thread in process %d", self._pid)
        _finalize_with_multiprocessing(self)

    def _may_wait(self) -> bool:
        """Whether the next signal() may wait: a first use here, or a write-ahead to disk."""
        return self._pid != os.getpid() or self._write_ahead or self.closed

    def _after_fork_in_child(self) -> None:
        """In a forked child: the loop thread did not come along; start anew on first use."""
        # Another thread may have held the lock at fork time: never wait on it here.
        self._lock = threading.Lock()
        _lifecycle.keep_inherited(self._loop, self._thread)
        self._loop = self._thread = None
        self._pid = -1

    def _call(self, coro: Coroutine[Any, Any, _T], wait: float | None) -> _T:
        """Run ``coro`` on the loop and wait for it (at most ``wait`` seconds)."""
        loop = self._loop
        assert loop is not None
        if threading.current_thread() is self._thread:
            coro.close()
            raise WrongEventLoopError(
                "this SyncTelemetryClient method cannot be called from its own loop thread "
                "(an on_drop/on_error callback): it would wait for itself"
            )
        return asyncio.run_coroutine_threadsafe(coro, loop).result(wait)

    # ----------------------------------------------------------------------------- signals

    def signal(
        self,
        signal_type: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        float_value: float | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Queue one signal; callable from any thread, returns without network I/O.

        The arguments are those of :meth:`TelemetryClient.signal
        <telemetrydeck_async.TelemetryClient.signal>`, checked in the calling thread
        (:class:`~telemetrydeck_async.InvalidSignalError` there, nothing queued). With
        ``durability="always"`` it returns once the signal is on disk (waiting at most
        ``request_timeout``), so it survives ``kill -9``. Raises
        :class:`~telemetrydeck_async.ClientClosedError` once closed.
        """
        self._hand_over(signal_type, client_user, session_id, payload, float_value, test_mode)

    def _hand_over(
        self,
        signal_type: str,
        client_user: str | None,
        session_id: str | None,
        payload: Mapping[str, Any] | None,
        float_value: float | None,
        test_mode: bool | None,
        params: dict[str, PayloadValue] | None = None,
    ) -> None:
        """Build the signal here, then give it to the loop (the one path of every call)."""
        client = self._running()
        if client is None:  # disabled: checked like an enabled call, then dropped
            self._client._validate_disabled(
                signal_type, client_user, session_id, payload, float_value, test_mode, params
            )
            return
        signal = client._build(
            signal_type, client_user, session_id, payload, float_value, test_mode, params
        )
        if signal is None:  # before_send dropped it (counted by the client)
            return
        if self._write_ahead and threading.current_thread() is not self._thread:
            self._hand_over_to_disk(client, signal)
            return
        # On the loop's thread it is queued at once; from any other, handed over through the
        # pipeline's inbox, one loop wake-up per burst, and never left uncounted by a close.
        client._enqueue_anywhere(signal)

    def _hand_over_to_disk(self, client: TelemetryClient, signal: Signal) -> None:
        """durability="always": queue on the loop and wait (bounded) until it is on disk."""
        loop = self._loop
        assert loop is not None
        submit = client._submit(signal)
        try:
            future = asyncio.run_coroutine_threadsafe(submit, loop)
        except RuntimeError:  # the loop is closed
            submit.close()
            raise ClientClosedError(
                "this SyncTelemetryClient's event loop has ended; the signal was not queued"
            ) from None
        # As in _hand_over: a close that began after the scheduling runs after this coroutine;
        # one that began before may have stopped the loop already. Not started: refused.
        if self._closed and future.cancel():
            submit.close()
            raise ClientClosedError("this SyncTelemetryClient is closed; the signal was not queued")
        wait = client.config.request_timeout
        try:
            future.result(wait)
        except concurrent.futures.TimeoutError:
            # Still being written, and counted: the caller is not held any longer.
            log.warning("a signal was not on disk within %g s; not waiting longer", wait)

    error = _sync_preset(Presets.error)
    navigation = _sync_preset(Presets.navigation)
    purchase_completed = _sync_preset(Presets.purchase_completed)
    free_trial_started = _sync_preset(Presets.free_trial_started)
    converted_from_trial = _sync_preset(Presets.converted_from_trial)
    new_install_detected = _sync_preset(Presets.new_install_detected)
    user_acquired = _sync_preset(Presets.user_acquired)
    lead_started = _sync_preset(Presets.lead_started)
    lead_converted = _sync_preset(Presets.lead_converted)
    onboarding_completed = _sync_preset(Presets.onboarding_completed)
    core_feature_used = _sync_preset(Presets.core_feature_used)

    def duration(
        self,
        signal_type: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        float_value: float | None = None,
        test_mode: bool | None = None,
    ) -> Duration:
        """Time a block (``with``) or a function (decorator) and send ``signal_type``.

        The same timer as :meth:`TelemetryClient.duration
        <telemetrydeck_async.TelemetryClient.duration>`, usable from any thread.
        """
        return self._emitter.duration(
            signal_type,
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            float_value=float_value,
            test_mode=test_mode,
        )

    def new_session(
        self,
        session_id: str | None = None,
        *,
        client_user: str | None = None,
        test_mode: bool | None = None,
    ) -> str:
        """Start a new session and send ``TelemetryDeck.Session.started``; return its id.

        As :meth:`TelemetryClient.new_session <telemetrydeck_async.TelemetryClient.new_session>`.
        """
        if session_id is None:
            session_id = str(uuid.uuid4())
        check_optional_text("session_id", session_id, exact=True)
        self._hand_over(SESSION_STARTED, client_user, session_id, None, None, test_mode, {})
        self._client._session_id = session_id
        return session_id

    # ----------------------------------------------------------------------------- flush, close

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Send what is queued so far, waiting at most ``timeout`` seconds.

        Without a timeout, as :meth:`TelemetryClient.flush
        <telemetrydeck_async.TelemetryClient.flush>`: it waits while signals keep moving and
        returns once nothing moved for ``close_timeout`` seconds. What is not sent stays
        queued (or spooled) and is counted in the result's ``pending``; it is sent later, or
        at the close. Never raises for delivery errors.
        Starts the client when it was not yet used in this process, so a spool left by an
        earlier run starts being sent.
        """
        if self.closed or self._running() is None:
            # Closed (the close accounted for everything), or disabled: nothing to send.
            return FlushResult(sent=0, spooled=0, dropped={}, pending=0)
        # Without a timeout the async flush bounds itself (close_timeout without progress).
        wait = None if timeout is None else _wait_bound(timeout)
        try:
            return self._call(self._client.flush(timeout), wait)
        except concurrent.futures.TimeoutError:
            return FlushResult(sent=0, spooled=0, dropped={}, pending=self.stats.pending)

    def close(self, timeout: float | None = None) -> FlushResult:
        """Flush, then stop: bounded by ``timeout`` (default ``close_timeout``); idempotent.

        What cannot be sent in time goes to the spool, or is dropped with reason ``shutdown``
        when there is none. The loop thread ends; later calls raise ``ClientClosedError``.
        """
        with self._lock:
            if self._close_result is not None:
                return self._close_result
            self._closed = True
            loop, thread = self._loop, self._thread
            if loop is None or self._pid != os.getpid():
                # Never started in this process: nothing of this process to send.
                result = FlushResult(sent=0, spooled=0, dropped={}, pending=0)
            else:
                bound = self._client.config.close_timeout if timeout is None else timeout
                try:
                    result = self._call(self._client.aclose(bound), _wait_bound(bound))
                except concurrent.futures.TimeoutError:
                    log.warning("the SyncTelemetryClient's close did not end in time")
                    result = FlushResult(sent=0, spooled=0, dropped={}, pending=self.stats.pending)
                else:
                    loop.call_soon_threadsafe(loop.stop)
                    if thread is not None:
                        thread.join(_GRACE)
            self._close_result = result
            return result

    def __enter__(self) -> SyncTelemetryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------- serverless

    @overload
    def flush_after(
        self, handler: Callable[_P, Awaitable[_R]]
    ) -> Callable[_P, Awaitable[_R]]: ...  # pragma: no cover

    @overload
    def flush_after(self, handler: Callable[_P, _R]) -> Callable[_P, _R]: ...  # pragma: no cover

    def flush_after(self, handler: Callable[_P, Any]) -> Callable[_P, Any]:
        """Decorate a handler (sync or async) to flush, bounded, after every invocation.

        For AWS Lambda and similar platforms, which freeze a warm process between
        invocations (a background send would stall) and end it without an exit hook: what
        the invocation queued is sent before it returns, or spooled within the flush's bound
        (``close_timeout``). The handler's result or exception passes through unchanged. For
        an async handler the flush runs in a worker thread, not on the handler's loop.
        """
        if inspect.iscoroutinefunction(handler):

            @functools.wraps(handler)
            async def flushed_async(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                try:
                    return await handler(*args, **kwargs)
                finally:
                    await asyncio.to_thread(self.flush)

            return flushed_async

        @functools.wraps(handler)
        def flushed(*args: _P.args, **kwargs: _P.kwargs) -> Any:
            try:
                return handler(*args, **kwargs)
            finally:
                self.flush()

        return flushed

    def __repr__(self) -> str:
        state = "closed" if self.closed else "started" if self._pid == os.getpid() else "idle"
        return f"<SyncTelemetryClient app_id={self.config.app_id!r} {state}>"


def _wait_bound(bound: float) -> float | None:
    """How long a caller waits for an operation bounded by ``bound`` seconds on the loop."""
    return None if math.isinf(bound) else bound + _GRACE


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # Stopped by close(): the client is closed, nothing is left on the loop.
        if not sys.is_finalizing():
            loop.close()


def _close_quietly(ref: weakref.ReferenceType[SyncTelemetryClient]) -> None:
    facade = ref()
    if facade is not None:
        try:
            facade.close()
        except Exception:
            log.warning("could not close a SyncTelemetryClient at process exit", exc_info=True)


def _finalize_with_multiprocessing(facade: SyncTelemetryClient) -> None:
    """In a child made by ``multiprocessing``, close at its exit (which skips ``atexit``)."""
    util = sys.modules.get("multiprocessing.util")
    process = sys.modules.get("multiprocessing.process")
    if util is None or process is None or process.parent_process() is None:
        return
    util.Finalize(facade, _close_quietly, args=(weakref.ref(facade),), exitpriority=10)


def _after_fork_in_child() -> None:
    for facade in list(_facades):
        facade._after_fork_in_child()


def _close_all_at_exit() -> None:
    """atexit: close every facade with its own ``close()``, before ``_lifecycle``'s hook runs.

    The facade's close, not the bare pipeline close the exit hook would run: callers may still
    be handing signals over from daemon threads, and only the facade's close settles each of
    them (queued, or refused) and then stops the loop thread.
    """
    for facade in list(_facades):
        _close_quietly(weakref.ref(facade))


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
# Registered after _lifecycle's handler (imported above), so it runs first: atexit is LIFO.
atexit.register(_close_all_at_exit)
