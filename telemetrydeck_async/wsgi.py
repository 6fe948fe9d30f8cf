"""WSGI integration (Flask, Pyramid, Bottle, any WSGI app): one signal per request. ::

    from flask import Flask
    from telemetrydeck_async import SyncTelemetryClient
    from telemetrydeck_async.wsgi import TelemetryMiddleware

    td = SyncTelemetryClient("APP-ID", namespace="com.example")
    app = Flask(__name__)
    app.wsgi_app = TelemetryMiddleware(app.wsgi_app, td)

    @app.post("/checkout")
    def checkout() -> str:
        td.signal("Checkout.Payment.completed", client_user="user-42")
        return "ok"

The client may be made at import time, in a gunicorn ``--preload`` master too: a
:class:`~telemetrydeck_async.SyncTelemetryClient` starts its loop in each worker on first use,
and closes (bounded) when the worker exits. No framework is imported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Final

from ._http import (
    DEFAULT_REQUEST_SIGNAL,
    UNMATCHED_ROUTE,
    RequestFilter,
    RequestInfo,
    RequestSignals,
)
from ._sync import SyncTelemetryClient

__all__ = [
    "DEFAULT_REQUEST_SIGNAL",
    "RequestFilter",
    "RequestInfo",
    "TelemetryMiddleware",
    "route_of",
]

# WSGI, spelled out (PEP 3333) so that type checking needs no framework.
_Environ = dict[str, Any]
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
_StartResponse = Callable[..., Callable[[bytes], object]]
_WSGIApp = Callable[[_Environ, _StartResponse], Iterable[bytes]]

#: Where frameworks leave the matched route in the environ: (key, attribute with the template).
_ROUTE_HINTS: Final = (
    ("werkzeug.request", "url_rule.rule"),  # Flask (Werkzeug's request object)
    ("bottle.route", "rule"),  # Bottle
    ("bfg.routes.matched_route", "pattern"),  # Pyramid's URL dispatch
)


def route_of(environ: _Environ) -> str:
    """The matched route template of a finished request, from what the framework left.

    Reads Flask's ``url_rule``, Bottle's ``route.rule`` and Pyramid's matched route pattern;
    ``"(unmatched)"`` otherwise (a 404, another framework). The raw path is never used.
    """
    for key, attribute in _ROUTE_HINTS:
        found: Any = environ.get(key)
        for name in attribute.split("."):
            found = getattr(found, name, None)
        if isinstance(found, str) and found:
            return found
    return UNMATCHED_ROUTE


class TelemetryMiddleware:
    """WSGI middleware: one signal per HTTP request, as the Starlette middleware sends.

    The signal (type ``signal_type``, default ``HTTP.Request.completed``) carries the route
    template, the method, the status class and the duration in ms (until the response body
    was sent and closed) as ``floatValue``; see :mod:`telemetrydeck_async._http`. Queuing it
    does no I/O, and a failure is logged (rate-limited), never raised into the response.

    Args:
        app: the WSGI app to wrap.
        client: the :class:`~telemetrydeck_async.SyncTelemetryClient` to send with.
        signal_type: the signal type, ``Scope.SubScope.lowerCamel`` style.
        filter: ``filter(info) -> bool``; False skips the request.
        client_user: ``client_user(environ) -> str | None``: the user id of a request.
        route: ``route(environ) -> str``: the route template (default :func:`route_of`).
    """

    def __init__(
        self,
        app: _WSGIApp,
        client: SyncTelemetryClient,
        *,
        signal_type: str = DEFAULT_REQUEST_SIGNAL,
        filter: RequestFilter | None = None,
        client_user: Callable[[_Environ], str | None] | None = None,
        route: Callable[[_Environ], str] = route_of,
    ) -> None:
        self.app = app
        self._client = client
        self._signals = RequestSignals(signal_type, filter)
        self._client_user = client_user
        self._route = route

    def __call__(self, environ: _Environ, start_response: _StartResponse) -> Iterable[bytes]:
        """Serve one request; its signal is queued once the response is closed."""
        started = time.perf_counter()
        status = [500]
        route: list[str] = []

        def start_and_watch(
            status_line: str, headers: list[tuple[str, str]], exc_info: _ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            status[0] = int(status_line.split(" ", 1)[0])
            # Read the route now: Flask forgets its request object once the view returned.
            route[:] = [self._route_of(environ)]
            if exc_info is None:
                return start_response(status_line, headers)
            return start_response(status_line, headers, exc_info)

        try:
            body = self.app(environ, start_and_watch)
        except Exception:
            self._record(environ, 500, started, route)
            raise
        return _Body(body, lambda: self._record(environ, status[0], started, route))

    def _route_of(self, environ: _Environ) -> str:
        try:
            return self._route(environ)
        except Exception as exc:
            self._signals.warn("route", "the route hook raised; using (unmatched)", exc)
            return UNMATCHED_ROUTE

    def _record(self, environ: _Environ, status: int, started: float, route: list[str]) -> None:
        info = RequestInfo(
            method=str(environ.get("REQUEST_METHOD", "")),
            route=route[0] if route else self._route_of(environ),
            path=str(environ.get("PATH_INFO", "")),
            status=status,
            duration_ms=(time.perf_counter() - started) * 1000.0,
        )
        if not self._signals.wanted(info):
            return
        self._signals.send(self._client, info, self._signals.user_of(self._client_user, environ))


class _Body:
    """The app's response body, passed through; ``close()`` also records the request."""

    def __init__(self, body: Iterable[bytes], on_close: Callable[[], None]) -> None:
        self._body = body
        self._on_close: Callable[[], None] | None = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        """Close the app's body (PEP 3333), then record the request once."""
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()
