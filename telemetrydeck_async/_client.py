"""The facade users touch: :class:`TelemetryClient`.

It validates a call, builds a :class:`~._signal.Signal` and puts it in the batcher; everything
after that belongs to the flusher. ``signal()`` does no network I/O and creates no task or
future; its only file I/O is once per client, when the first signal that names no user reads
the default-user file (and, on an installation's first run, creates it).
The TelemetryDeck presets (``error()``, ``duration()``...) live in ``_presets.py``; they reach
the same path through ``_emit()``, the one door for reserved ``TelemetryDeck.`` names.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import os
import ssl as _ssl
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, ParamSpec, TypeVar

from . import _lifecycle
from ._batcher import Batcher, batch_budget
from ._config import (
    DEFAULT_BASE_URL,
    BeforeSend,
    ClientConfig,
    Durability,
    OnDrop,
    OnError,
    disabled_by_env,
    options_from_env,
)
from ._flusher import Flusher, take_back
from ._identity import default_user_path, load_or_create_default_user
from ._parameters import sdk_parameters
from ._presets import NEW_INSTALL_DETECTED, SESSION_STARTED, Presets
from ._retry import RetryPolicy
from ._signal import (
    SDK_KEY_PREFIX,
    CheckedPayload,
    PayloadValue,
    SharedPayload,
    Signal,
    UserHasher,
    check_optional_text,
    check_utf8,
    encode_checked,
    encode_members,
    new_signal,
    normalize_flagged,
    normalize_payload,
    plain_members,
    validate_float_value,
    validate_type,
)
from ._stats import Accounting, FlushResult, Stats
from ._transport import Transport
from .exceptions import (
    ClientClosedError,
    ConfigurationError,
    InvalidSignalError,
    WrongEventLoopError,
)

__all__ = ["TelemetryClient"]

# Module globals are found faster than a module's attribute: once per signal.
_isfinite: Final = math.isfinite
_time: Final = time.time
# The running loop or None, without the exception get_running_loop() raises off a loop.
_running_loop: Final = asyncio.events._get_running_loop

# Signal types found valid (the checks in _build pass): each is checked once per process.
# Bounded; a set's add and lookup are atomic, so signal_threadsafe() callers may share it.
_GOOD_TYPES: set[str] = set()
_GOOD_TYPES_MAX = 4096

# A disabled client validates calls but never hashes a real id or touches the default-user file.
_DISABLED_USER: Final = "telemetrydeck-async-disabled"
#: How long start() waits for the spool to open before it lets the client run without it.
_SPOOL_OPEN_WAIT: Final = 5.0
#: The own payload of a signal sent without one (shared: signals never mutate their payload).
_NO_PAYLOAD: Final[Mapping[str, PayloadValue]] = MappingProxyType({})

#: What a closed client answers every call that would queue a signal.
_CLOSED: Final = "this TelemetryClient is closed; create a new one"

#: The kinds of call ``_gate`` admits: ``await signal()``, ``signal_nowait()`` (on the loop's
#: thread), ``signal_threadsafe()`` (any thread, a started client).
_Call = Literal["await", "nowait", "threadsafe"]

_C = TypeVar("_C", bound="TelemetryClient")
_P = ParamSpec("_P")
_R = TypeVar("_R")


class TelemetryClient(Presets):
    """An asyncio client for the TelemetryDeck Ingest API v2.

    Signals are validated at once, queued in memory, and sent by one background task in
    JSON-array batches (on ``batch_size`` signals, ``max_batch_bytes`` bytes or every
    ``flush_interval`` seconds), retried with backoff on failure. Use it as an async context
    manager, or call ``aclose()`` when done::

        async with TelemetryClient("APP-ID", namespace="com.example") as td:
            await td.signal("Checkout.Payment.completed", client_user="user-42")

    Args:
        app_id: the app ID from the TelemetryDeck dashboard.
        namespace: your organisation's namespace (e.g. ``"com.example"``); without it the
            legacy ``/v2/`` endpoint is used.
        base_url: the ingest server (default ``https://nom.telemetrydeck.com``); ``http://``
            only for loopback, e.g. the local emulator.
        salt: appended to user ids before hashing (default ``""``). Never sent or logged.
        default_user: the user id for signals that name none. Without it, a random id made
            once per installation and kept in a file (see ``default_user_file``) is used.
        session_id: the session id of every signal (default: a new UUID4 per client);
            ``new_session()`` starts another.
        test_mode: mark signals as test data (default False).
        default_payload: payload merged under every signal's own payload (the call wins).
            The SDK parameters (``TelemetryDeck.SDK.*``, ``TelemetryDeck.Device.*``) are
            added to every signal and cannot be overridden.
        batch_size: signals per request at most (default 100, as the official SDKs).
        max_batch_bytes: bytes per request body at most (default 1 MiB).
        flush_interval: seconds a signal may wait for a batch to fill (default 5).
        max_queue_size: signals held in memory at most (default 50,000, about 17 MiB: a burst
            of 50,000 from synchronous code fits); past it, signals go to the spool, or are
            dropped with reason ``queue_full``. ``await signal()`` first
            waits briefly for room while the endpoint is healthy, so bursts are not dropped.
        request_timeout: seconds for one request, connect to last byte (default 10).
        close_timeout: seconds ``aclose()`` may take at most (default 10).
        max_concurrent_requests: requests in flight at once (default 2).
        retry: a :class:`RetryPolicy` (backoff, deadline, probe interval).
        spool_dir: a directory for the on-disk spool; None keeps everything in memory.
        durability: ``"spill"`` (disk only when memory or the network fails) or ``"always"``.
        spool_max_bytes: the spool's size cap (default 64 MiB); the oldest go first.
        spool_max_age: seconds a spooled signal is kept (default 7 days).
        on_drop: ``on_drop(signals, reason)`` when signals are given up.
        on_error: ``on_error(exc)`` when the background task handles a delivery error.
        app_version: your application's version, sent as ``TelemetryDeck.AppInfo.version``.
        signal_prefix: prepended to every signal type (e.g. ``"MyApp."``), except types that
            begin with ``TelemetryDeck.``.
        payload_prefix: prepended to every payload key, default payload included, except
            keys that begin with ``TelemetryDeck.``.
        default_user_file: where the default user id is kept (default: in ``spool_dir`` when
            set, else ``telemetrydeck-async/`` in the user data directory, e.g.
            ``$XDG_DATA_HOME`` or ``~/.local/share`` on Linux). Written once, mode 0600.
        enabled: False makes every call a no-op (arguments are still validated, so tests
            catch bad calls): no task, no file, no network, all stats zero. The environment
            variable ``TELEMETRYDECK_DISABLED=1`` does the same for every client.
        proxy: an ``http://[user:password@]host:port`` proxy for every request; wins over
            the environment. Loopback hosts are never proxied.
        ssl: a CA bundle path (file or directory) or an ``ssl.SSLContext`` for servers or
            TLS-inspecting proxies signed by a private CA. Default: the system's trust store.
            Verification is never off unless a context says so (then a WARNING is logged).
        trust_env: read ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` (default True), as
            ``requests`` and ``httpx`` do.
        before_send: ``before_send(signal) -> signal | None``, called in the caller's thread
            for each accepted signal with a plain dict (``type``, ``payload``,
            ``floatValue``, ``sessionID``, ``isTestMode``; ``payload`` holds your keys and
            ``default_payload``, not the SDK's ``TelemetryDeck.*`` keys). Return it, changed
            or not, or None to drop it (counted in ``stats.dropped["before_send"]``). What it
            returns is checked like a call's arguments; if it raises, the signal is kept as
            it was and a WARNING is logged (rate-limited).
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
        self._config = config = ClientConfig(
            app_id=app_id,
            namespace=namespace,
            salt=salt,
            default_user=default_user,
            session_id=session_id,
            test_mode=test_mode,
            default_payload=default_payload,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            flush_interval=flush_interval,
            max_queue_size=max_queue_size,
            request_timeout=request_timeout,
            close_timeout=close_timeout,
            max_concurrent_requests=max_concurrent_requests,
            retry=retry if retry is not None else RetryPolicy(),
            spool_dir=spool_dir,
            durability=durability,
            spool_max_bytes=spool_max_bytes,
            spool_max_age=spool_max_age,
            on_drop=on_drop,
            on_error=on_error,
            app_version=app_version,
            signal_prefix=signal_prefix,
            payload_prefix=payload_prefix,
            default_user_file=default_user_file,
            enabled=enabled,
            base_url=base_url,
            proxy=proxy,
            ssl=ssl,
            trust_env=trust_env,
            before_send=before_send,
        )
        self._enabled = config.enabled and not disabled_by_env()
        self._session_id = config.session_id or str(uuid.uuid4())
        self._hash_user = UserHasher(config.salt)
        self._user_hashes = self._hash_user.cache
        self._signal_prefix = config.signal_prefix or ""
        self._payload_prefix = prefix = config.payload_prefix or ""
        # The base payload of every signal, built once: the (prefixed) default payload, then
        # the SDK parameters, which nothing can override. Signals share this dict when the
        # call has no payload of its own (signals never mutate their payload).
        self._caller_defaults: dict[str, PayloadValue] = {
            prefix + key: value for key, value in config.default_payload.items()
        }
        self._sdk_payload = sdk_parameters(config.app_version)
        self._default_payload = {**self._caller_defaults, **self._sdk_payload}
        # ...and encoded once: each signal then carries only its own keys, and the encoder
        # writes this fragment in front of them. The caller's default keys are the only ones
        # a call may override (SDK keys cannot be set by callers): such a call merges instead.
        self._shared = SharedPayload.of(self._default_payload)
        #: The most one signal may take on the wire: what a request of its own has room for.
        self._lone_room = batch_budget(config.max_batch_bytes)
        self._overridable = frozenset(prefix + key for key in config.default_payload)
        # Whether a call's own payload goes on the wire as the caller wrote it (no key
        # prefixed, none overriding a default): then a checked or plain payload is used as is.
        self._own_as_is = not prefix and not self._overridable
        # None until a signal needs it: then read from (or created in) the default-user file.
        self._default_user: str | None = config.default_user
        if not self._enabled:
            self._default_user = _DISABLED_USER
        self._default_hash: str | None = None
        self._write_ahead = config.spool_dir is not None and config.durability == "always"
        # A disabled client never calls the hook: it sends nothing, so there is nothing to vet.
        self._before_send = config.before_send if self._enabled else None
        self._new_pipeline()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._close_result: FlushResult | None = None
        # The one close in progress: every aclose() awaits it (shielded), see aclose().
        self._closing: asyncio.Task[FlushResult] | None = None
        self._exit_ticket: _lifecycle.ExitTicket | None = None
        self._signal_handlers: _lifecycle.SignalHandlers | None = None
        _lifecycle.track(self, type(self)._after_fork_in_child)

    def _new_pipeline(self) -> None:
        """Build the accounting, batcher and flusher (at construction, and after fork())."""
        config = self._config
        self._accounting = Accounting(on_drop=config.on_drop, on_error=config.on_error)
        self._batcher = Batcher(
            app_id=config.app_id,
            batch_size=config.batch_size,
            max_batch_bytes=config.max_batch_bytes,
            max_queue_size=config.max_queue_size,
        )
        self._flusher = Flusher(
            config=config,
            batcher=self._batcher,
            transport=self._make_transport(config),
            accounting=self._accounting,
        )
        # The pipeline's way in, bound once: the hot path makes no extra call to reach it.
        self._enqueue = self._flusher.admit
        # A loop callback is scheduled to queue what other threads handed over.
        self._drain_scheduled = False

    def _make_transport(self, config: ClientConfig) -> Transport:
        """The HTTP edge the flusher sends through.

        A seam for :mod:`telemetrydeck_async.testing`, whose client records request bodies
        instead of posting them; everything above the transport runs unchanged.
        """
        return Transport(
            config.endpoint_url,
            config.request_timeout,
            max_connections=config.max_concurrent_requests,
            proxy=config.proxy,
            ssl=config.ssl,
            trust_env=config.trust_env,
        )

    @classmethod
    def from_env(cls: type[_C], **overrides: Any) -> _C:
        """A client configured from ``TELEMETRYDECK_*`` environment variables.

        Reads ``TELEMETRYDECK_APP_ID`` (required), ``TELEMETRYDECK_NAMESPACE``,
        ``TELEMETRYDECK_SALT``, ``TELEMETRYDECK_TEST_MODE`` (``1/true/yes/on`` or
        ``0/false/no/off``), ``TELEMETRYDECK_BASE_URL`` and ``TELEMETRYDECK_SPOOL_DIR``; empty
        variables count as unset. Keyword arguments are any constructor options and win over
        the environment. A missing required variable raises :class:`ConfigurationError`
        naming it, except when the client is disabled (``TELEMETRYDECK_DISABLED=1`` or
        ``enabled=False``): an opted-out user needs no configuration.
        """
        options = options_from_env()
        options.update(overrides)
        app_id = options.pop("app_id", None)
        if app_id is None:
            if options.get("enabled") is False or disabled_by_env():
                app_id = "disabled"
            else:
                raise ConfigurationError(
                    "TELEMETRYDECK_APP_ID",
                    "the environment variable is not set; set it to the app ID from the "
                    "dashboard, or pass app_id=",
                )
        return cls(app_id, **options)

    # ----------------------------------------------------------------------------- properties

    @property
    def config(self) -> ClientConfig:
        """The validated options this client was built with."""
        return self._config

    @property
    def session_id(self) -> str:
        """The session id sent with signals that do not name their own."""
        return self._session_id

    @property
    def closed(self) -> bool:
        """True once ``aclose()`` was called."""
        return self._closed

    @property
    def enabled(self) -> bool:
        """False when ``enabled=False`` or ``TELEMETRYDECK_DISABLED`` made this client a no-op."""
        return self._enabled

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters: what was sent, spooled, dropped, and what is pending."""
        flusher = self._flusher
        return self._accounting.snapshot(
            queue_depth=flusher.queue_depth,
            in_flight=flusher.in_flight,
            parked=flusher.parked,
        )

    # ----------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> TelemetryClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind the client to the running loop and start its flusher (``async with`` does it).

        With ``spool_dir`` it also waits (a few seconds at most) for the spool to open, so the
        first signals that need the disk never wait for it. A disabled client starts nothing.
        """
        if self._enabled:
            self._bind_loop()
            await self._flusher.link.ready(_SPOOL_OPEN_WAIT)

    def _bind_loop(self) -> None:
        if self._closed:
            raise ClientClosedError(_CLOSED)
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._flusher.start()
            self._exit_ticket = _lifecycle.opened(self._flusher, loop, self._closed_without_loop)
        elif loop is not self._loop:
            raise WrongEventLoopError(
                "this TelemetryClient is bound to another event loop; create one client per "
                "loop, or hand signals over from other threads with signal_threadsafe()"
            )

    async def flush(self, timeout: float | None = None) -> FlushResult:
        """Send everything queued so far and return what was accounted for meanwhile.

        Waits until every signal queued before the call is sent, spooled or dropped, or
        until ``timeout`` seconds pass (``math.inf``: as long as delivery takes). Without a
        timeout it waits while signals keep moving and returns once nothing was sent,
        spooled or dropped for ``close_timeout`` seconds (10 s): a slow but healthy endpoint
        is drained, and a short job never waits out the retry deadline (120 s) for an
        unreachable one. What is not sent stays queued (or spooled) and is counted in the
        result's ``pending``. Never raises for delivery errors.
        """
        if not self._enabled:
            return FlushResult(sent=0, spooled=0, dropped={}, pending=0)
        self._bind_loop()
        if timeout is None:
            return await self._flush_while_moving(self._config.close_timeout)
        return await self._flusher.flush(None if math.isinf(timeout) else timeout)

    async def _flush_while_moving(self, quiet: float) -> FlushResult:
        """flush() by default: rounds of ``quiet`` seconds, until one moves nothing."""
        flusher = self._flusher
        target = flusher.batcher.put_total  # only what was queued before the call
        sent = spooled = 0
        dropped: Counter[str] = Counter()
        while True:
            result = await flusher.flush(quiet)
            sent += result.sent
            spooled += result.spooled
            dropped.update(result.dropped)
            moved = result.sent or result.spooled or result.dropped
            if not result.pending or not moved or flusher._flushed(target):
                return FlushResult(
                    sent=sent, spooled=spooled, dropped=dict(dropped), pending=result.pending
                )

    def flush_after(
        self, handler: Callable[_P, Awaitable[_R]]
    ) -> Callable[_P, Coroutine[Any, Any, _R]]:
        """Decorate an async handler to ``flush()`` (bounded) after every invocation.

        For AWS Lambda and similar platforms that freeze a warm process between
        invocations: what the invocation queued is sent before it returns (or stays
        queued/spooled past ``close_timeout``). Sync handlers: use
        ``SyncTelemetryClient.flush_after``.
        """
        if not inspect.iscoroutinefunction(handler):
            raise ConfigurationError(
                "handler",
                "TelemetryClient.flush_after needs an async function; for a "
                "synchronous handler use SyncTelemetryClient.flush_after",
            )

        @functools.wraps(handler)
        async def flushed(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return await handler(*args, **kwargs)
            finally:
                await self.flush()

        return flushed

    async def new_session(
        self,
        session_id: str | None = None,
        *,
        client_user: str | None = None,
        test_mode: bool | None = None,
    ) -> str:
        """Start a new session and send ``TelemetryDeck.Session.started``; return its id.

        Later signals that name no session carry the new id: ``session_id`` when given, else
        a new UUID4. The client does not send ``Session.started`` for the session it begins
        with; call this when your application has a notion of sessions (a login, a job).
        """
        if session_id is None:
            session_id = str(uuid.uuid4())
        check_optional_text("session_id", session_id, exact=True)
        await self._emit(
            SESSION_STARTED, {}, client_user=client_user, session_id=session_id, test_mode=test_mode
        )
        self._session_id = session_id
        return session_id

    async def aclose(self, timeout: float | None = None) -> FlushResult:
        """Flush, then stop: bounded by ``timeout`` (default ``close_timeout``), idempotent.

        What cannot be sent in time goes to the spool, or is dropped with reason
        ``shutdown`` when there is none. Later ``signal()`` calls raise ``ClientClosedError``.
        Concurrent calls share one close; a caller cancelled while waiting leaves the close
        running to its bounded end. Called on another loop after the client's own loop has
        ended, it spools (or drops) what is left without network I/O.
        """
        if self._close_result is not None:
            return self._close_result
        running = asyncio.get_running_loop()
        if self._loop is not None and running is not self._loop:
            return self._close_without_own_loop()
        closing = self._closing
        if closing is None or (closing.done() and (closing.cancelled() or closing.exception())):
            self._closed = True
            budget = self._config.close_timeout if timeout is None else timeout
            closing = self._closing = running.create_task(
                self._close(budget), name="telemetrydeck-close"
            )
        return await asyncio.shield(closing)

    async def _close(self, budget: float) -> FlushResult:
        try:
            if self._loop is None:
                result = FlushResult(sent=0, spooled=0, dropped={}, pending=0)
            else:
                result = await self._flusher.close(budget)
        finally:
            if self._signal_handlers is not None:
                self._signal_handlers.uninstall()
        # Only a finished close retires the exit ticket: if this one is cut short (the loop
        # is torn down), the exit hook still finds what is left.
        _lifecycle.closed(self._exit_ticket)
        self._close_result = result
        return result

    def _close_without_own_loop(self) -> FlushResult:
        loop = self._loop
        assert loop is not None
        if loop.is_running() and not loop.is_closed():
            raise WrongEventLoopError(
                "this TelemetryClient's event loop still runs in another thread: close it there "
                "(e.g. asyncio.run_coroutine_threadsafe(client.aclose(), loop))"
            )
        ticket = self._exit_ticket
        assert ticket is not None  # bound with the loop
        self._closed = True
        # The same close as the exit hook's; it reports to _closed_without_loop().
        return _lifecycle.finish_without_loop(ticket, "aclose() ran after the client's loop ended")

    def _closed_without_loop(self, result: FlushResult) -> None:
        """What was left was spooled or dropped without a loop: the client is closed."""
        self._closed = True
        self._close_result = result

    def _after_fork_in_child(self) -> None:
        """In a forked child: forget the parent's queue, task, session and loop.

        The fork hook this client hands to ``_lifecycle.track``. The parent alone sends what it
        had queued; this process starts over with an empty queue, a new session id (unless one
        was configured) and binds its own loop on next use.
        """
        handlers = self._signal_handlers
        if handlers is not None:
            handlers.forget_after_fork()
        _lifecycle.keep_inherited(self._flusher, self._loop, handlers, self._closing)
        self._signal_handlers = None
        self._exit_ticket = None
        self._closing = None
        if self._closed:
            if self._close_result is None:  # the parent was closing it: nothing is left here
                self._close_result = FlushResult(sent=0, spooled=0, dropped={}, pending=0)
            return
        self._loop = None
        if self._config.session_id is None:
            self._session_id = str(uuid.uuid4())
        self._new_pipeline()

    def install_signal_handlers(self, signals: Iterable[int] | None = None) -> None:
        """Close gracefully on SIGTERM and SIGINT, then let the signal do what it did before.

        For applications that own their event loop (``asyncio.run(main())``, a worker, a CLI):
        on the first signal ``aclose()`` runs (bounded by ``close_timeout``), the previous
        handlers are put back and the signal is raised again, so SIGTERM then ends the process
        as it would have and SIGINT raises ``KeyboardInterrupt``. A second signal during the
        close skips the wait. ``aclose()`` removes the handlers.

        Not for apps run by uvicorn, gunicorn or aiohttp's ``run_app``: those handle signals
        and shut the app down themselves (use the integrations' lifespan helpers there).
        Call it on the running loop in the main thread; POSIX only (asyncio raises
        ``NotImplementedError`` elsewhere). ``signals``: signal numbers (default SIGTERM,
        SIGINT). A disabled client installs nothing.
        """
        if not self._enabled:
            return
        self._bind_loop()
        if self._signal_handlers is None:
            loop = asyncio.get_running_loop()
            self._signal_handlers = _lifecycle.SignalHandlers(self.aclose, loop)
        self._signal_handlers.install(_lifecycle.DEFAULT_SIGNALS if signals is None else signals)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_loop", None) is not None and not getattr(self, "_closed", True):
            _warn(
                f"unclosed TelemetryClient with {len(self._batcher)} queued signal(s); "
                "use 'async with TelemetryClient(...)' or call 'await client.aclose()'",
                ResourceWarning,
                source=self,
                stacklevel=2,
            )

    # ----------------------------------------------------------------------------- signals

    def _build(
        self,
        signal_type: str,
        client_user: str | None,
        session_id: str | None,
        payload: Mapping[str, Any] | None,
        float_value: float | None,
        test_mode: bool | None,
        params: dict[str, PayloadValue] | None = None,
    ) -> Signal | None:
        # None only when before_send dropped the signal (already counted).
        # ``params``: the TelemetryDeck keys of a preset, already validated. Only presets pass
        # them, and only they may use a reserved type (they never pass a caller's unchecked one).
        if params is None:
            # Checked once per type: services send the same few types again and again.
            if type(signal_type) is not str or signal_type not in _GOOD_TYPES:
                if (
                    type(signal_type) is not str
                    or not signal_type
                    or signal_type.startswith(SDK_KEY_PREFIX)
                    or signal_type.isspace()
                    or not signal_type.isascii()  # the rare non-ASCII type: check it encodes
                ):
                    validate_type(signal_type)  # raises with the precise reason
                elif len(_GOOD_TYPES) < _GOOD_TYPES_MAX:
                    _GOOD_TYPES.add(signal_type)
            if self._signal_prefix:
                signal_type = self._signal_prefix + signal_type
        elif self._signal_prefix and not signal_type.startswith(SDK_KEY_PREFIX):
            signal_type = self._signal_prefix + signal_type
        if client_user is not None:
            # The hasher's cache, read here first: a call per signal costs as much as the lookup.
            hashed = self._user_hashes.get(client_user) if type(client_user) is str else None
            if hashed is None:
                hashed = self._hash_user(client_user)
        elif (hashed := self._default_hash) is None:  # kept: most calls name no user
            hashed = self._hash_default_user()
        shared: SharedPayload | None = self._shared
        own: Mapping[str, PayloadValue]
        # The own payload's JSON members, when they are at hand before the encoder runs.
        members: bytes | None = None
        # Whether the own payload holds a float, for the encoder; None where the payload was
        # rebuilt (merge, preset keys) and the encoder looks for itself.
        floats: bool | None = False
        if type(payload) is CheckedPayload and self._own_as_is:
            own, members = payload, payload.members  # checked and encoded when it was made
        elif payload and self._own_as_is and (members := plain_members(payload)) is not None:
            # The common payload, a dict of known keys and str/int/bool values, is its own
            # normalised form: encoded as it is, not copied first (about 100 bytecodes for
            # three keys). The signal refers to the caller's dict, as its body is already
            # encoded; nothing reads a built signal's payload again (see Signal).
            own = payload
        elif payload:
            own, floats = normalize_flagged(payload)
            if self._payload_prefix:
                prefix = self._payload_prefix
                own = {prefix + key: value for key, value in own.items()}
            if self._overridable and not self._overridable.isdisjoint(own):
                # The call overrides a default key: one merged dict, in the reference order.
                own = {**self._default_payload, **own}
                shared = None
                floats = None
        else:
            if payload is not None and not isinstance(payload, Mapping):
                normalize_payload(payload)  # raises the right error
            own = _NO_PAYLOAD
        if params:
            own = {**own, **params}
            members = floats = None
        if float_value is not None and (
            type(float_value) is not float or not _isfinite(float_value)
        ):
            float_value = validate_float_value(float_value)  # converts, or raises the reason
        if test_mode is None:
            test_mode = self._config.test_mode
        elif type(test_mode) is not bool:
            raise InvalidSignalError("test_mode", "must be a bool or None")
        if session_id is None:
            session_id = self._session_id
        elif type(session_id) is not str or not session_id:
            raise InvalidSignalError("session_id", "must be a non-empty str or None")
        elif not session_id.isascii():
            check_utf8("session_id", session_id)
        hook = self._before_send
        if hook is not None:  # the whole cost of the hook when none is set
            # Inline, not a method: a hook that changes nothing must stay cheap (benchmarks/).
            # The hook may change the payload in place: it gets a copy, and what it returns is
            # compared with the checked original (one small copy; comparing with the caller's
            # argument instead would let a changed value skip the checks).
            defaults = self._caller_defaults
            if shared is not None and not params:
                shown = {**defaults, **own} if defaults else dict(own)
                reference = shown.copy() if defaults else own
            else:  # own holds SDK or preset keys too: show only the caller's
                mine = {k: v for k, v in own.items() if not k.startswith(SDK_KEY_PREFIX)}
                shown = mine if shared is None else {**defaults, **mine}
                reference = shown.copy()
            view: dict[str, Any] = {
                "type": signal_type,
                "payload": shown,
                "floatValue": float_value,
                "sessionID": session_id,
                "isTestMode": test_mode,
            }
            try:
                result = hook(view)
            except Exception as exc:
                self._accounting.warnings.log(
                    logging.WARNING,
                    "before_send",
                    "the before_send hook raised %s; the signal is sent unchanged",
                    type(exc).__name__,
                    exc_info=exc,
                )
            else:
                if not (
                    result is view
                    and view.get("type") is signal_type
                    and view.get("floatValue") is float_value
                    and view.get("payload") is shown
                    and shown == reference
                ):
                    vetted = self._vet(result, view, signal_type, shown, reference, hashed)
                    if vetted is None:
                        return None
                    signal_type, new_payload, float_value = vetted
                    if new_payload is not None:  # replaced: no shared fragment
                        own, shared = {**self._sdk_payload, **new_payload, **(params or {})}, None
                        members = floats = None
        if members is None:
            members = encode_members(own, floats)
        now = _time()
        # The checks above hold what encode_fields would check again: straight to the bytes.
        body = encode_checked(
            self._config.app_id,
            signal_type,
            hashed,
            session_id,
            test_mode,
            members,
            float_value,
            now,
            shared,
        )
        # Encoded here, once (the queue, the spool and a thread's hand-over all take these
        # bytes): a signal too large for a request of its own is refused before it is queued.
        if len(body) > self._lone_room:
            raise InvalidSignalError(
                "payload",
                f"the signal encodes to {len(body)} bytes, more than the "
                f"{self._config.max_batch_bytes} bytes "
                f"max_batch_bytes allows for one request; send less (large values belong "
                f"in your own storage, with an id in the payload) or raise max_batch_bytes",
            )
        return new_signal(
            Signal,
            (signal_type, hashed, session_id, test_mode, own, float_value, now, shared, body),
        )

    def _vet(
        self,
        result: object,
        view: dict[str, Any],
        original_type: str,
        shown: dict[str, PayloadValue],
        reference: Mapping[str, PayloadValue],
        hashed: str,
    ) -> tuple[str, dict[str, PayloadValue] | None, float | None] | None:
        """Check what ``before_send`` returned: type, new payload (None: unchanged), floatValue.

        None when the hook dropped the signal (counted here). A bad result raises
        ``InvalidSignalError`` naming the field, as the same value in a call would.
        """
        if result is None:
            app_id = self._config.app_id
            self._count_hook_drop(lambda: [{"appID": app_id, "clientUser": hashed, **view}])
            return None
        if type(result) is not dict:
            raise InvalidSignalError(
                "before_send",
                f"must return the signal dict or None, got {type(result).__name__}",
            )
        signal_type: Any = result.get("type")
        new_payload = result.get("payload")
        float_value = result.get("floatValue")
        try:
            if signal_type != original_type:  # a preset's reserved type may stay as it is
                signal_type = validate_type(signal_type)
            if float_value is not None:
                float_value = validate_float_value(float_value)
            if new_payload is shown and shown == reference:
                payload = None
            else:
                payload = normalize_payload({} if new_payload is None else new_payload)
        except InvalidSignalError as exc:
            field = {"float_value": "floatValue"}.get(exc.field, exc.field)
            raise InvalidSignalError(f"{field} (returned by before_send)", exc.reason) from None
        return signal_type, payload, float_value

    def _count_hook_drop(self, bodies: Callable[[], list[dict[str, Any]]]) -> None:
        """Count a signal ``before_send`` dropped: accepted, then dropped, on the loop."""

        def record() -> None:
            self._accounting.record_enqueued()
            self._accounting.record_dropped("before_send", 1, bodies)

        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and running is not loop:
            # Another thread (signal_threadsafe): the counters belong to the loop's thread.
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody else counts
                loop.call_soon_threadsafe(record)
                return
        record()

    def _hash_default_user(self) -> str:
        """The default user's hash, found (or made) once and kept for the calls naming none."""
        user = self._default_user
        if user is None:
            user = self._resolve_default_user()
        self._default_hash = hashed = self._hash_user(user)
        return hashed

    def _resolve_default_user(self) -> str:
        # Once per client, on the first signal that names no user: a small file read (and on
        # the very first run, one write). Cheap enough to do inline, and doing it lazily means
        # clients that always pass client_user never create the file.
        path = default_user_path(
            self._config.app_id, self._config.spool_dir, self._config.default_user_file
        )
        user, created = load_or_create_default_user(path)
        self._default_user = user
        if created:
            # A new installation, as the official SDKs report on first launch.
            signal = self._build(NEW_INSTALL_DETECTED, user, None, None, None, None, {})
            if signal is not None:
                self._enqueue_anywhere(signal)
        return user

    async def _submit(self, signal: Signal) -> None:
        """The awaiting path: write ahead (durability "always"), wait for room, enqueue."""
        spool_id = None
        if self._write_ahead:
            # On disk (group-committed) before signal() returns: survives kill -9.
            spool_id = await self._flusher.link.write_ahead(signal)
        if not self._batcher.space.is_set():
            await self._wait_for_room()
        self._enqueue(signal, spool_id)

    async def signal(
        self,
        signal_type: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        float_value: float | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Queue one signal of type ``signal_type`` (e.g. ``"Checkout.Payment.completed"``).

        Validates at once and raises :class:`InvalidSignalError` (nothing queued) for a bad
        argument; otherwise returns without network I/O (the first signal without
        ``client_user`` reads, or creates, the default-user file once). When the queue is full
        and the endpoint is healthy, waits briefly for room (backpressure) before spooling or
        dropping.

        Args:
            signal_type: ``Scope.SubScope.lowerCamel`` style type name.
            client_user: the user's id; hashed with the salt before it is queued.
            session_id: overrides the client's session id for this signal.
            payload: a flat mapping of str keys to str, int, float, bool (None values are
                skipped; datetimes become ISO-8601 strings).
            float_value: a finite number, sent as the top-level ``floatValue``.
            test_mode: overrides the client's ``test_mode`` for this signal.
        """
        # _prepare, inline (a Python call of seven arguments saved on every call): on the
        # common path (bound to this loop, open) one comparison; the rest is _gate's.
        if (self._loop is not asyncio.get_running_loop() or self._closed) and not self._gate(
            "await"
        ):
            self._validate_disabled(
                signal_type, client_user, session_id, payload, float_value, test_mode
            )
            return
        signal = self._build(signal_type, client_user, session_id, payload, float_value, test_mode)
        if signal is not None:
            if self._write_ahead or not self._batcher.space.is_set():
                await self._submit(signal)
            else:
                # The common case, without a coroutine for _submit: room, nothing to write.
                self._enqueue(signal)

    def _prepare(
        self,
        signal_type: str,
        client_user: str | None,
        session_id: str | None,
        payload: Mapping[str, Any] | None,
        float_value: float | None,
        test_mode: bool | None,
        params: dict[str, PayloadValue] | None = None,
    ) -> Signal | None:
        """The checks of an awaiting call on the loop: the signal, or None (disabled client)."""
        # The common case (bound to this loop, open) costs one comparison; the rest is _gate's.
        if (self._loop is not asyncio.get_running_loop() or self._closed) and not self._gate(
            "await"
        ):
            self._validate_disabled(
                signal_type, client_user, session_id, payload, float_value, test_mode, params
            )
            return None
        return self._build(
            signal_type, client_user, session_id, payload, float_value, test_mode, params
        )

    def _prepare_nowait(
        self,
        signal_type: str,
        client_user: str | None,
        session_id: str | None,
        payload: Mapping[str, Any] | None,
        float_value: float | None,
        test_mode: bool | None,
        params: dict[str, PayloadValue] | None = None,
    ) -> Signal | None:
        """The checks of a synchronous call on the loop: the signal, or None (disabled)."""
        loop = _running_loop()
        if (loop is None or loop is not self._loop or self._closed) and not self._gate("nowait"):
            self._validate_disabled(
                signal_type, client_user, session_id, payload, float_value, test_mode, params
            )
            return None
        return self._build(
            signal_type, client_user, session_id, payload, float_value, test_mode, params
        )

    def _gate(self, call: _Call) -> bool:
        """The one place a call is let in when it is off the common path.

        True: build and queue (bound to the running loop when ``call`` runs on one). False:
        a disabled client; the caller checks the arguments with ``_validate_disabled`` (which
        refuses a closed client) and queues nothing. Raises ``ClientClosedError`` for a closed
        client and ``WrongEventLoopError`` for the wrong (or no) loop, in the order each kind
        of call has always checked them: a synchronous call off any loop is told so first.
        """
        if not self._enabled:
            return False
        if call == "threadsafe":
            if self._closed:
                raise ClientClosedError(_CLOSED)
            if self._loop is None:
                raise WrongEventLoopError(
                    "signal_threadsafe() needs a started client: enter 'async with "
                    "TelemetryClient(...)' or 'await client.start()' on the loop that owns it "
                    "first"
                )
            return True
        if call == "nowait":
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                raise WrongEventLoopError(
                    "signal_nowait() must be called from the client's event loop thread; "
                    "from other threads use signal_threadsafe()"
                ) from None
        self._bind_loop()
        return True

    async def _wait_for_room(self) -> None:
        if self._flusher.healthy:
            # Backpressure: a full queue with a healthy endpoint drains within a request's
            # time, so waiting here beats dropping a burst. Bounded, never forever.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._batcher.space.wait(), self._config.request_timeout)
        else:
            # The overflow goes to the spool: keep pace with the disk, not past it.
            await self._flusher.link.wait_for_overflow_room(self._config.request_timeout)

    def _validate_disabled(
        self,
        signal_type: str,
        client_user: str | None,
        session_id: str | None,
        payload: Mapping[str, Any] | None,
        float_value: float | None,
        test_mode: bool | None,
        params: dict[str, PayloadValue] | None = None,
    ) -> None:
        # A disabled client checks the call like an enabled one (so tests run with telemetry
        # off still catch bad calls) and then drops it: nothing is queued or counted.
        if self._closed:
            raise ClientClosedError(_CLOSED)
        self._build(signal_type, client_user, session_id, payload, float_value, test_mode, params)

    def signal_nowait(
        self,
        signal_type: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        float_value: float | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Like :meth:`signal`, for synchronous code running on the client's loop.

        Never waits: with a full queue the signal goes to the spool or is dropped
        (``queue_full``). Must be called on the loop's thread while the loop runs; from any
        other thread it raises ``WrongEventLoopError`` (use :meth:`signal_threadsafe`), so a
        signal is always queued, spooled or dropped by the time this returns.
        """
        # _prepare_nowait, inline (a Python call of seven arguments, ~1k instructions, saved
        # on every call): on the common path (this loop's thread, bound and open) one
        # comparison; the rest is _gate's.
        loop = _running_loop()
        if (loop is None or loop is not self._loop or self._closed) and not self._gate("nowait"):
            self._validate_disabled(
                signal_type, client_user, session_id, payload, float_value, test_mode
            )
            return
        signal = self._build(signal_type, client_user, session_id, payload, float_value, test_mode)
        if signal is not None:
            self._enqueue(signal)

    def _nowait_ready(self) -> bool:
        """Bind to the running loop for a synchronous call; False for a disabled client.

        Raises ``WrongEventLoopError`` off the loop thread and ``ClientClosedError`` when
        closed, so a ``with td.duration(...)`` fails before its block runs.
        """
        return self._gate("nowait")

    def signal_threadsafe(
        self,
        signal_type: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        float_value: float | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Like :meth:`signal_nowait`, callable from any thread (Django/Flask worker threads).

        The arguments are validated in the calling thread, so a bad call raises
        :class:`InvalidSignalError` there and queues nothing; the signal is then handed to the
        client's loop through an inbox (one ``loop.call_soon_threadsafe`` wake-up per burst)
        and this returns at once. The client must have been started on its loop first
        (``async with`` or ``await start()``), otherwise ``WrongEventLoopError``; once it is
        closed, or its loop has ended, ``ClientClosedError``. A call that returned is always
        in the books: a close takes what was handed over before it, a signal that reaches the
        loop after ``aclose()`` began is counted as dropped (reason ``shutdown``), and a call
        that loses the race to a close raises ``ClientClosedError`` instead.
        """
        if not self._gate("threadsafe"):
            self._validate_disabled(
                signal_type, client_user, session_id, payload, float_value, test_mode
            )
            return
        signal = self._build(signal_type, client_user, session_id, payload, float_value, test_mode)
        if signal is not None:
            self._enqueue_anywhere(signal)

    def _enqueue_anywhere(self, signal: Signal) -> None:
        """Enqueue on the loop thread directly; from any other thread, hand it over.

        Other threads append to the flusher's inbox (``deque.append`` is atomic) and schedule
        one loop callback per burst, not one per signal: a busy loop is not flooded with
        callbacks. A close that began meanwhile takes what is in the inbox, or the caller takes
        its signal back and is told: every call that returns is in the books.
        """
        loop = self._loop
        if loop is None or _running_loop() is loop:
            self._enqueue(signal)
            return
        flusher = self._flusher
        inbox = flusher.handed_over
        inbox.append(signal)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            try:
                loop.call_soon_threadsafe(self._take_handed_over)
            except RuntimeError:  # the loop is closed: nothing will take the inbox from it
                self._drain_scheduled = False
                take_back(inbox, signal, "this TelemetryClient's event loop has ended")
                return
        # Read after the append: a close that began later takes this signal with the inbox;
        # one that began earlier may have missed it, and then it is this caller's to take back.
        if self._closed or flusher.stopping or loop.is_closed():
            take_back(inbox, signal, _CLOSED)

    def _take_handed_over(self) -> None:
        """On the loop: queue what other threads handed over (see ``_enqueue_anywhere``)."""
        self._drain_scheduled = False
        if self._flusher.take_handed_over():
            # More arrived meanwhile: another turn, after the loop's other callbacks.
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._take_handed_over)

    # ----------------------------------------------------------------------------- presets

    async def _emit(
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
        """``signal()`` for presets: ``params`` are their validated ``TelemetryDeck.`` keys."""
        signal = self._prepare(
            signal_type, client_user, session_id, payload, float_value, test_mode, params
        )
        if signal is not None:
            await self._submit(signal)

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
        """``signal_nowait()`` for presets (the duration timer's exit)."""
        signal = self._prepare_nowait(
            signal_type, client_user, session_id, payload, float_value, test_mode, params
        )
        if signal is not None:
            self._enqueue(signal)
