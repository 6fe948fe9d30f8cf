"""Starlette and FastAPI integration: open the client at startup, close it at shutdown.

Importing this module needs Starlette (FastAPI ships it); ``import telemetrydeck_async`` alone
never imports Starlette, FastAPI or uvicorn. ::

    from typing import Annotated

    from fastapi import Depends, FastAPI
    from telemetrydeck_async import TelemetryClient
    from telemetrydeck_async.starlette import TelemetryMiddleware, get_telemetry, telemetry_lifespan

    def make_client() -> TelemetryClient:
        return TelemetryClient("APP-ID", namespace="com.example")

    app = FastAPI(lifespan=telemetry_lifespan(make_client))
    app.add_middleware(TelemetryMiddleware)  # optional: one signal per request

    @app.post("/checkout")
    async def checkout(td: Annotated[TelemetryClient, Depends(get_telemetry)]) -> dict[str, str]:
        await td.signal("Checkout.Payment.completed", client_user="user-42")
        return {"ok": "yes"}

* :func:`telemetry_lifespan` starts the client on the server's loop when the app starts, puts
  it on ``app.state.telemetry``, and closes it (bounded, see ``close_timeout``) when the
  server shuts down -- uvicorn does that on SIGTERM and SIGINT, gunicorn on its workers' exit.
* :func:`get_telemetry` returns that client from a request: a FastAPI dependency, or a plain
  call in a Starlette endpoint.
* :class:`TelemetryMiddleware` (pure ASGI, off unless added) sends one signal per HTTP
  request: see :mod:`telemetrydeck_async._http` for its type and payload keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import AbstractAsyncContextManager

# Read twice per request: a module global is found faster than time's attribute.
from time import perf_counter as _perf_counter
from typing import Any, Final

from ._client import TelemetryClient
from ._http import (
    DEFAULT_REQUEST_SIGNAL,
    UNMATCHED_ROUTE,
    RequestFilter,
    RequestInfo,
    RequestSignals,
)
from .exceptions import ConfigurationError

try:
    # A runtime import: FastAPI reads the dependency's annotation to hand it the request.
    from starlette.requests import HTTPConnection  # type: ignore[import-not-found,unused-ignore]  # reason: starlette is optional; without it mypy sees Any here
except ImportError as exc:  # pragma: no cover - exercised only without starlette
    raise ImportError(
        "telemetrydeck_async.starlette needs Starlette (FastAPI includes it): pip install starlette"
    ) from exc

__all__ = [
    "DEFAULT_REQUEST_SIGNAL",
    "STATE_KEY",
    "ClientSource",
    "RequestFilter",
    "RequestInfo",
    "TelemetryMiddleware",
    "get_telemetry",
    "telemetry_lifespan",
]

#: The attribute of ``app.state`` holding the client: ``app.state.telemetry``.
STATE_KEY: Final = "telemetry"

#: A client, or a zero-argument factory making one (made at startup, in the worker process).
ClientSource = TelemetryClient | Callable[[], TelemetryClient]

# ASGI, spelled out so that type checking does not need Starlette installed.
_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]
_Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def _resolve(source: ClientSource) -> TelemetryClient:
    client = source if isinstance(source, TelemetryClient) else source()
    if not isinstance(client, TelemetryClient):
        raise ConfigurationError(
            "client", f"the factory must return a TelemetryClient, got {type(client).__name__}"
        )
    return client


def telemetry_lifespan(client: ClientSource, *, lifespan: _Lifespan | None = None) -> _Lifespan:
    """A Starlette/FastAPI ``lifespan`` that runs ``client`` for the app's lifetime.

    At startup the client is made (when ``client`` is a factory: preferred, since it is then
    made in the worker process, after any fork), started on the server's loop and stored as
    ``app.state.telemetry``; at shutdown it is closed, which flushes what is queued within
    ``close_timeout`` and spools (or drops, counted) the rest. ``lifespan`` is your own
    lifespan, run inside: the client is usable during all of it, and whatever it yields
    (e.g. a state mapping) is passed on. A client instance can only be started once: pass
    a factory if the app is started more than once (as tests often do).
    """

    @contextlib.asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        td = _resolve(client)
        await td.start()
        try:
            setattr(app.state, STATE_KEY, td)
            if lifespan is None:
                yield None
            else:
                async with lifespan(app) as state:
                    yield state
        finally:
            await td.aclose()

    return run


def _from_state(state: Any) -> TelemetryClient:
    client = getattr(state, STATE_KEY, None)
    if not isinstance(client, TelemetryClient):
        raise ConfigurationError(
            "lifespan",
            "no TelemetryClient on app.state.telemetry: create the app with "
            "lifespan=telemetry_lifespan(...)",
        )
    return client


def get_telemetry(request: HTTPConnection) -> TelemetryClient:
    """The app's client, from a request: ``Depends(get_telemetry)`` in FastAPI.

    Raises :class:`~telemetrydeck_async.ConfigurationError` when the app was not created with
    :func:`telemetry_lifespan` (in a mounted sub-application, ``request.app`` is the sub-app:
    give it its own lifespan, or pass the client explicitly).
    """
    return _from_state(request.app.state)


def _template(route: Any) -> str:
    """A route's path template, without converters (``/items/{id}``)."""
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) and template else UNMATCHED_ROUTE


def _mount_prefix(route: Any) -> str:
    # A Mount's path_format ends with the "/{path}" that captures the rest of the URL.
    return _template(route).removesuffix("/{path}")


def _find_template(
    routes: Sequence[Any], is_target: Callable[[Any], bool], prefix: str, depth: int = 0
) -> str | None:
    for route in routes:
        if is_target(route):
            return prefix + _template(route)
        children = getattr(route, "routes", None)
        if children and depth < 8:
            found = _find_template(children, is_target, prefix + _mount_prefix(route), depth + 1)
            if found is not None:
                return found
    return None


class TelemetryMiddleware:
    """ASGI middleware: one signal per HTTP request (add it to opt in).

    The signal (type ``signal_type``, default ``HTTP.Request.completed``) carries the route
    template, the method, the status class and the duration in ms as ``floatValue``; see
    :mod:`telemetrydeck_async._http`. It is queued without I/O after the app returns; a
    failure to queue it is logged (rate-limited) and never affects the response.

    Args:
        app: the ASGI app to wrap (Starlette's ``add_middleware`` passes it).
        client: the client to use; default: ``app.state.telemetry`` set by
            :func:`telemetry_lifespan`, looked up on each request.
        signal_type: the signal type, ``Scope.SubScope.lowerCamel`` style.
        filter: ``filter(info) -> bool``; False skips the request (e.g. health checks:
            ``lambda info: info.route != "/healthz"``).
        client_user: ``client_user(connection) -> str | None``: the user id of a request
            (hashed like any other); None or no hook: the client's default user.
    """

    def __init__(
        self,
        app: _ASGIApp,
        *,
        client: TelemetryClient | None = None,
        signal_type: str = DEFAULT_REQUEST_SIGNAL,
        filter: RequestFilter | None = None,
        client_user: Callable[[HTTPConnection], str | None] | None = None,
    ) -> None:
        self.app = app
        self._client = client
        self._signals = RequestSignals(signal_type, filter)
        self._client_user = client_user
        # Route object id -> (route, template): the routes of an app live as long as the app.
        self._templates: dict[int, tuple[Any, str]] = {}
        # (app, its client) of the last request: a Starlette ``State`` lookup costs a few µs.
        self._cached: tuple[Any, TelemetryClient] | None = None

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """Serve one ASGI connection; HTTP requests are timed and signalled."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = _perf_counter()
        status = 500

        def send_and_watch(message: _Message) -> Awaitable[None]:
            # Not a coroutine function: the app awaits the server's own send directly, so
            # watching the status adds no coroutine per message (two per request).
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            return send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception:
            self._record(scope, status, started)
            raise
        self._record(scope, status, started)

    def _record(self, scope: _Scope, status: int, started: float) -> None:
        duration_ms = (_perf_counter() - started) * 1000.0
        # The common case inline (a route seen before, the app's client remembered): this
        # runs once per request, and each Python call saved is a few hundred instructions.
        route_key = scope.get("route")
        if route_key is None:
            route_key = scope.get("endpoint")
        # No route: id(None) is never a key (None outlives every route), so this finds nothing.
        known = self._templates.get(id(route_key))
        route = known[1] if known is not None and known[0] is route_key else self._route(scope)
        method = scope.get("method", "")
        if type(method) is not str:
            method = str(method)
        signals = self._signals
        if signals.filter is not None:
            info = RequestInfo(
                method=method,
                route=route,
                path=str(scope.get("path", "")),
                status=status,
                duration_ms=duration_ms,
            )
            if not signals.wanted(info):
                return
        client = self._client
        if client is None:
            cached = self._cached
            if cached is not None and cached[0] is scope.get("app") and not cached[1].closed:
                client = cached[1]
            else:
                client = self._app_client(scope)
        user = None
        if self._client_user is not None:
            try:
                user = self._client_user(HTTPConnection(scope))
            except Exception as exc:
                signals.warn("user", "the client_user hook raised; using the default", exc)
        signals.send_request(client, method, route, status, duration_ms, user)

    def _app_client(self, scope: _Scope) -> TelemetryClient | None:
        """The client on ``app.state.telemetry``, remembered per app while it is open."""
        app = scope.get("app")
        cached = self._cached
        if cached is not None and cached[0] is app and not cached[1].closed:
            return cached[1]
        client = getattr(getattr(app, "state", None), STATE_KEY, None)
        if not isinstance(client, TelemetryClient):
            return None
        # A restarted app (a new lifespan) gets a new client: the closed one is looked up again.
        self._cached = (app, client)
        return client

    def _route(self, scope: _Scope) -> str:
        # Starlette sets scope["route"] to the matched route; older releases set only
        # scope["endpoint"], so the route is then found by its endpoint.
        route = scope.get("route")
        key = route if route is not None else scope.get("endpoint")
        if key is None:
            return UNMATCHED_ROUTE
        cached = self._templates.get(id(key))
        if cached is not None and cached[0] is key:
            return cached[1]

        def is_target(candidate: Any) -> bool:
            if route is not None:
                return candidate is route
            return getattr(candidate, "endpoint", None) is key

        # Routers overwrite scope["route"] level by level: walk down from the outermost router
        # to the matched route, so the template has every mount's prefix in front.
        router = scope.get("router")
        template = None
        if router is not None:
            template = _find_template(getattr(router, "routes", ()), is_target, "")
        if template is None:
            template = _template(route) if route is not None else UNMATCHED_ROUTE
        if len(self._templates) > 10_000:  # routes made on the fly: keep memory flat
            self._templates.clear()
        self._templates[id(key)] = (key, template)
        return template
