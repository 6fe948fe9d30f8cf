"""Django integration: a request-signal middleware and the project's client. ::

    # settings.py
    MIDDLEWARE = [
        "telemetrydeck_async.django.TelemetryMiddleware",  # first: it times the whole stack
        # ...
    ]
    TELEMETRYDECK = {"app_id": "APP-ID", "namespace": "com.example", "salt": "..."}

    # views.py
    from telemetrydeck_async.django import get_telemetry

    def checkout(request):
        get_telemetry().signal("Checkout.Payment.completed", client_user=str(request.user.pk))
        ...

* :func:`get_telemetry` returns the process's :class:`~telemetrydeck_async.SyncTelemetryClient`,
  made on first use from the ``TELEMETRYDECK`` setting (a dict of the constructor's option
  names) when present, else from the ``TELEMETRYDECK_*`` environment variables
  (:meth:`~telemetrydeck_async.SyncTelemetryClient.from_env`). It works under ``runserver``,
  gunicorn sync workers (``--preload`` too: each worker starts its own loop on first use) and
  ASGI servers; it closes itself, bounded, when the process exits.
* :class:`TelemetryMiddleware` sends one signal per request, the same type and payload keys as
  the Starlette middleware (see :mod:`telemetrydeck_async._http`); the route is the URL
  pattern (``/items/<int:pk>/``), never the raw path. It is sync and async capable; under ASGI
  it never blocks the event loop. Optional settings: ``TELEMETRYDECK_REQUEST_SIGNAL`` (the
  signal type), ``TELEMETRYDECK_REQUEST_FILTER`` (a ``filter(info) -> bool`` callable, or
  its dotted path) and ``TELEMETRYDECK_REQUEST_USER`` (``user(request) -> str | None``, the
  user id of a request, hashed like any other; default: the client's default user).
* :func:`with_lifespan` wraps Django's ASGI application so that the server's lifespan
  shutdown closes the client. Needed under uvicorn: after its graceful shutdown it re-raises
  SIGTERM with the default disposition, which ends the process without running ``atexit``
  hooks, so the client's exit close never runs and what it still held is lost.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._http import DEFAULT_REQUEST_SIGNAL, UNMATCHED_ROUTE, RequestInfo, RequestSignals
from ._sync import SyncTelemetryClient
from .exceptions import ConfigurationError

try:
    from asgiref.sync import (  # type: ignore[import-not-found,import-untyped,unused-ignore]  # reason: optional, untyped
        iscoroutinefunction,
        markcoroutinefunction,
        sync_to_async,
    )
    from django.conf import settings  # type: ignore[import-not-found,import-untyped,unused-ignore]  # reason: optional, untyped
    from django.utils.module_loading import (  # type: ignore[import-not-found,import-untyped,unused-ignore]  # reason: optional, untyped
        import_string,
    )
except ImportError as exc:  # pragma: no cover - exercised only without Django
    raise ImportError("telemetrydeck_async.django needs Django: pip install django") from exc

__all__ = ["TelemetryMiddleware", "get_telemetry", "with_lifespan"]

_log = logging.getLogger("telemetrydeck_async")

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Scope]]
_Send = Callable[[_Scope], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_client: SyncTelemetryClient | None = None
_lock = threading.Lock()


def get_telemetry() -> SyncTelemetryClient:
    """The project's client: made once per process from ``settings.TELEMETRYDECK`` or the env.

    Raises :class:`~telemetrydeck_async.ConfigurationError` naming the setting (or the
    variable) when the options are invalid or missing.
    """
    global _client
    client = _client
    if client is not None:
        return client
    with _lock:
        if _client is None:
            options = getattr(settings, "TELEMETRYDECK", None)
            if options is None:
                _client = SyncTelemetryClient.from_env()
            elif not isinstance(options, dict) or "app_id" not in options:
                raise ConfigurationError(
                    "TELEMETRYDECK",
                    "the setting must be a dict with at least 'app_id' (and any other "
                    "SyncTelemetryClient option by name)",
                )
            else:
                _client = SyncTelemetryClient(**options)
        return _client


def _hook(name: str, shape: str) -> Callable[..., Any] | None:
    """An optional callable setting, given as the callable or its dotted path."""
    found = getattr(settings, name, None)
    if isinstance(found, str):
        found = import_string(found)
    if found is not None and not callable(found):
        raise ConfigurationError(name, f"must be a callable {shape} or its dotted path")
    return found


class TelemetryMiddleware:
    """Django middleware: one signal per request (type ``HTTP.Request.completed``).

    The payload: the URL pattern of the matched route, the method, the status class; the
    duration in ms as ``floatValue``. A failure to queue is logged (rate-limited) and never
    changes the response.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._signals = RequestSignals(
            getattr(settings, "TELEMETRYDECK_REQUEST_SIGNAL", DEFAULT_REQUEST_SIGNAL),
            _hook("TELEMETRYDECK_REQUEST_FILTER", "filter(info) -> bool"),
        )
        self._client_user = _hook("TELEMETRYDECK_REQUEST_USER", "user(request) -> str | None")
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)
        # Queuing may wait (the first use starts the loop; durability="always" waits for
        # the disk): under ASGI that part runs in a worker thread, never on the event loop.
        self._record_off_loop = sync_to_async(self._record, thread_sensitive=False)

    def __call__(self, request: Any) -> Any:
        """Serve one request (the async path under ASGI)."""
        if self._async:
            return self._acall(request)
        started = time.perf_counter()
        try:
            response = self.get_response(request)
        except Exception:
            self._record(request, 500, started)
            raise
        self._record(request, int(response.status_code), started)
        return response

    async def _acall(self, request: Any) -> Any:
        started = time.perf_counter()
        get_response: Callable[[Any], Awaitable[Any]] = self.get_response
        try:
            response = await get_response(request)
        except Exception:
            await self._record_async(request, 500, started)
            raise
        await self._record_async(request, int(response.status_code), started)
        return response

    async def _record_async(self, request: Any, status: int, started: float) -> None:
        client = _client
        if client is not None and not client._may_wait():
            self._record(request, status, started)  # a hand-over only: fine on the loop
        else:
            await self._record_off_loop(request, status, started)

    def _record(self, request: Any, status: int, started: float) -> None:
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None)
        info = RequestInfo(
            method=str(request.method or ""),
            route="/" + route.lstrip("/") if isinstance(route, str) else UNMATCHED_ROUTE,
            path=str(request.path),
            status=status,
            duration_ms=(time.perf_counter() - started) * 1000.0,
        )
        if not self._signals.wanted(info):
            return
        try:
            client = get_telemetry()
        except Exception as exc:
            self._signals.warn("config", "telemetry is not configured", exc)
            return
        self._signals.send(client, info, self._signals.user_of(self._client_user, request))


def with_lifespan(application: _ASGIApp) -> _ASGIApp:
    """Django's ASGI application, plus the ASGI lifespan: the server's shutdown closes the client.

    ::

        # asgi.py
        application = with_lifespan(get_asgi_application())

    Django itself does not speak the lifespan protocol. Without it, the client closes at the
    process's exit (``atexit``), which uvicorn skips: after its graceful shutdown it re-raises
    SIGTERM, and the default disposition ends the process on the spot. Here the close runs in
    a worker thread, bounded by ``close_timeout``, before the server reports the shutdown
    complete; what it cannot send goes to the spool, or is dropped and counted.
    """

    async def app(scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "lifespan":
            await application(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                client = _client
                if client is not None:
                    try:
                        await asyncio.to_thread(client.close)
                    except Exception:  # telemetry never fails the server's shutdown
                        _log.exception("closing the telemetry client at shutdown failed")
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app
