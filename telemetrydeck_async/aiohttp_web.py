"""aiohttp.web integration: open the client at startup, close it at cleanup. ::

    from aiohttp import web
    from telemetrydeck_async import TelemetryClient
    from telemetrydeck_async.aiohttp_web import TELEMETRY_KEY, telemetry_ctx, telemetry_middleware

    async def checkout(request: web.Request) -> web.Response:
        td = request.app[TELEMETRY_KEY]
        await td.signal("Checkout.Payment.completed", client_user="user-42")
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[telemetry_middleware()])  # middleware: optional
    def make_client() -> TelemetryClient:
        return TelemetryClient("APP-ID", namespace="com.example")

    app.cleanup_ctx.append(telemetry_ctx(make_client))
    app.router.add_post("/checkout", checkout)
    web.run_app(app)

* :func:`telemetry_ctx` is a ``cleanup_ctx`` entry: it starts the client on the app's loop at
  startup, stores it under :data:`TELEMETRY_KEY`, and closes it (bounded by
  ``close_timeout``) at cleanup -- which ``web.run_app`` runs on SIGTERM and SIGINT.
* :func:`get_telemetry` finds the client from a request, in sub-applications too.
* :func:`telemetry_middleware` (off unless added) sends one signal per request: see
  :mod:`telemetrydeck_async._http` for its type and payload keys.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ._client import TelemetryClient
from ._http import (
    DEFAULT_REQUEST_SIGNAL,
    UNMATCHED_ROUTE,
    RequestFilter,
    RequestInfo,
    RequestSignals,
)
from .exceptions import ConfigurationError

__all__ = [
    "DEFAULT_REQUEST_SIGNAL",
    "TELEMETRY_KEY",
    "ClientSource",
    "RequestFilter",
    "RequestInfo",
    "get_telemetry",
    "telemetry_ctx",
    "telemetry_middleware",
]

#: Where :func:`telemetry_ctx` keeps the client: ``app[TELEMETRY_KEY]``.
TELEMETRY_KEY: Final[web.AppKey[TelemetryClient]] = web.AppKey("telemetrydeck", TelemetryClient)

#: A client, or a zero-argument factory making one (made at startup, in the worker process).
ClientSource = TelemetryClient | Callable[[], TelemetryClient]


def telemetry_ctx(
    client: ClientSource,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry that runs ``client`` for the app's lifetime.

    At startup the client is made (when ``client`` is a factory: preferred, since it is then
    made in the worker process), started on the app's loop and stored as
    ``app[TELEMETRY_KEY]``; at cleanup it is closed: what is queued is flushed within
    ``close_timeout``, the rest spooled (or dropped, counted). Append it before the entries
    that use the client, so it is closed after them. A client instance can only be started
    once: pass a factory if the app is started more than once.
    """

    async def run(app: web.Application) -> AsyncIterator[None]:
        td = client if isinstance(client, TelemetryClient) else client()
        if not isinstance(td, TelemetryClient):
            raise ConfigurationError(
                "client", f"the factory must return a TelemetryClient, got {type(td).__name__}"
            )
        await td.start()
        try:
            app[TELEMETRY_KEY] = td
            yield
        finally:
            await td.aclose()

    return run


def get_telemetry(request: web.Request) -> TelemetryClient:
    """The client :func:`telemetry_ctx` stored, from a request (sub-applications included).

    Raises :class:`~telemetrydeck_async.ConfigurationError` when there is none.
    """
    client = request.config_dict.get(TELEMETRY_KEY)
    if client is None:
        raise ConfigurationError(
            "cleanup_ctx",
            "no TelemetryClient on the app: add app.cleanup_ctx.append(telemetry_ctx(...))",
        )
    return client


def _route_template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is None:  # no route matched: aiohttp's own 404/405 route
        return UNMATCHED_ROUTE
    return resource.canonical or UNMATCHED_ROUTE


def telemetry_middleware(
    *,
    client: TelemetryClient | None = None,
    signal_type: str = DEFAULT_REQUEST_SIGNAL,
    filter: RequestFilter | None = None,
    client_user: Callable[[web.Request], str | None] | None = None,
) -> Middleware:
    """An aiohttp middleware sending one signal per request (add it to opt in).

    The signal (type ``signal_type``, default ``HTTP.Request.completed``) carries the route
    template (``resource.canonical``, e.g. ``/items/{id}``), the method, the status class and
    the duration in ms as ``floatValue``; see :mod:`telemetrydeck_async._http`. Exceptions
    from the handler count with their status (``web.HTTPException``) or as 500 and are
    re-raised untouched; telemetry problems are logged (rate-limited), never raised.

    Args:
        client: the client to use; default: ``app[TELEMETRY_KEY]`` set by
            :func:`telemetry_ctx`, looked up on each request.
        signal_type: the signal type, ``Scope.SubScope.lowerCamel`` style.
        filter: ``filter(info) -> bool``; False skips the request (e.g. health checks).
        client_user: ``client_user(request) -> str | None``: the user id of a request
            (hashed like any other); None or no hook: the client's default user.
    """
    signals = RequestSignals(signal_type, filter)

    def record(request: web.Request, status: int, started: float) -> None:
        info = RequestInfo(
            method=request.method,
            route=_route_template(request),
            path=request.path,
            status=status,
            duration_ms=(time.perf_counter() - started) * 1000.0,
        )
        if not signals.wanted(info):
            return
        td = client if client is not None else request.config_dict.get(TELEMETRY_KEY)
        user = None
        if client_user is not None:
            try:
                user = client_user(request)
            except Exception as exc:
                signals.warn("user", "the client_user hook raised; using the default", exc)
        signals.send(td, info, user)

    @web.middleware
    async def telemetry(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            record(request, exc.status, started)
            raise
        except Exception:
            record(request, 500, started)
            raise
        record(request, response.status, started)
        return response

    return telemetry
