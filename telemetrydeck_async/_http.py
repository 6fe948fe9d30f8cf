"""The request signal shared by the web integrations (Starlette, aiohttp, Django, WSGI).

One signal per finished HTTP request, when the app opts in with a middleware:

========================  ===================================================================
type                      ``HTTP.Request.completed`` (configurable)
``HTTP.Request.route``    the route *template* (``/items/{item_id}``), never the raw path, so
                          ids in URLs neither leak nor explode the number of distinct values;
                          ``(unmatched)`` when no route matched
``HTTP.Request.method``   ``GET``, ``POST``...
``HTTP.Response.statusClass``  ``2xx``, ``4xx``, ``5xx``...
``floatValue``            the duration in milliseconds
========================  ===================================================================

Telemetry never breaks a request: a failing filter, user hook or signal is logged
(rate-limited) and the response goes out as usual. No framework is imported here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, TypeVar

import attrs

from ._client import TelemetryClient
from ._signal import CheckedPayload, validate_type
from ._stats import RateLimitedLog
from ._sync import SyncTelemetryClient

__all__ = [
    "DEFAULT_REQUEST_SIGNAL",
    "METHOD_KEY",
    "ROUTE_KEY",
    "STATUS_CLASS_KEY",
    "UNMATCHED_ROUTE",
    "RequestFilter",
    "RequestInfo",
    "RequestSignals",
    "status_class",
]

_T = TypeVar("_T")

#: The default type of the per-request signal.
DEFAULT_REQUEST_SIGNAL: Final = "HTTP.Request.completed"
#: Payload key: the route template.
ROUTE_KEY: Final = "HTTP.Request.route"
#: Payload key: the HTTP method.
METHOD_KEY: Final = "HTTP.Request.method"
#: Payload key: the status class, e.g. ``"2xx"``.
STATUS_CLASS_KEY: Final = "HTTP.Response.statusClass"
#: The route sent when no route matched (a 404, say): the raw path is never sent.
UNMATCHED_ROUTE: Final = "(unmatched)"


_STATUS_CLASSES: Final = tuple(f"{n}xx" for n in range(10))


def status_class(status: int) -> str:
    """``"2xx"`` for 200..299 and so on."""
    n = status // 100
    return _STATUS_CLASSES[n] if 0 <= n < 10 else f"{n}xx"


@attrs.frozen(kw_only=True)
class RequestInfo:
    """One finished HTTP request, as a request filter sees it.

    Attributes:
        method: the HTTP method, e.g. ``"GET"``.
        route: the route template, or ``"(unmatched)"``.
        path: the raw request path, for filtering only (it is never sent).
        status: the response status (500 when the app raised before answering).
        duration_ms: milliseconds from the request reaching the middleware to the app
            returning.
    """

    method: str
    route: str
    path: str
    status: int
    duration_ms: float


#: ``filter(info) -> bool``: False skips the request's signal (health checks, static files).
RequestFilter = Callable[[RequestInfo], bool]


@attrs.define
class RequestSignals:
    """Builds and queues the per-request signal; shared by both middlewares."""

    signal_type: str = attrs.field()
    filter: RequestFilter | None = None
    _warnings: RateLimitedLog = attrs.field(factory=RateLimitedLog, init=False)
    #: (route, method, status) -> the payload. A service answers few distinct combinations,
    #: so each payload is built, checked and encoded once (a read-only ``CheckedPayload``,
    #: which signals share): a request's signal then skips both.
    _payloads: dict[tuple[str, str, int], CheckedPayload] = attrs.field(factory=dict, init=False)

    @signal_type.validator
    def _check_type(self, _attr: object, value: str) -> None:
        validate_type(value)  # InvalidSignalError at app setup, not on every request

    def wanted(self, info: RequestInfo) -> bool:
        """Whether the filter lets this request's signal through (a raising filter: no)."""
        if self.filter is None:
            return True
        try:
            return bool(self.filter(info))
        except Exception as exc:
            self.warn("filter", "the request signal filter raised; skipping the signal", exc)
            return False

    def send(
        self,
        client: TelemetryClient | SyncTelemetryClient | None,
        info: RequestInfo,
        user: str | None,
    ) -> None:
        """Queue the signal for ``info`` on ``client`` (no I/O, never raises)."""
        self.send_request(client, info.method, info.route, info.status, info.duration_ms, user)

    def send_request(
        self,
        client: TelemetryClient | SyncTelemetryClient | None,
        method: str,
        route: str,
        status: int,
        duration_ms: float,
        user: str | None,
    ) -> None:
        """:meth:`send` from the request's figures, without a :class:`RequestInfo` (no filter)."""
        if client is None:
            self.warn(
                "no-client",
                "no TelemetryClient for the request signal: set up the integration's "
                "lifespan/cleanup_ctx helper, or pass client=",
            )
            return
        # On the loop thread the async client queues directly; the sync one hands over.
        emit = client.signal if isinstance(client, SyncTelemetryClient) else client.signal_nowait
        try:
            payload = self._payloads.get((route, method, status))
            if payload is None:
                payload = self._payload(route, method, status)
            emit(self.signal_type, client_user=user, payload=payload, float_value=duration_ms)
        except Exception as exc:
            self.warn("signal", "could not queue the request signal", exc)

    def _payload(self, route: str, method: str, status: int) -> CheckedPayload:
        """The payload of a combination not seen yet (remembered, in bounded memory).

        Raises ``InvalidSignalError`` for a value no signal may carry (a route template
        holding a lone surrogate): the caller logs it, as it would the signal's own error.
        """
        if len(self._payloads) >= 4096:  # routes made on the fly: keep memory flat
            self._payloads.clear()
        payload = self._payloads[(route, method, status)] = CheckedPayload(
            {ROUTE_KEY: route, METHOD_KEY: method, STATUS_CLASS_KEY: status_class(status)}
        )
        return payload

    def user_of(self, hook: Callable[[_T], str | None] | None, request: _T) -> str | None:
        """The user id ``hook`` gives for ``request``; None without a hook or when it raises."""
        if hook is None:
            return None
        try:
            return hook(request)
        except Exception as exc:
            self.warn("user", "the client_user hook raised; using the default", exc)
            return None

    def warn(self, key: str, msg: str, exc: BaseException | None = None) -> None:
        """Log a WARNING about the request signal, at most once a minute per ``key``."""
        self._warnings.log(logging.WARNING, key, msg + " (request served normally)", exc_info=exc)
