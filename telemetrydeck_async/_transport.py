"""The HTTP edge: one aiohttp session per client, and the only place that knows aiohttp.

Every way a request can fail is translated here, in one place, into the package's own
:class:`~telemetrydeck_async.exceptions.DeliveryError` classes; the delivery policy above reads
only those. Answers are read up to a small limit, so a misbehaving server cannot make the
client buffer megabytes.

The route to the endpoint is decided here too, once per session: an explicit ``proxy=``, else
the ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` environment (when ``trust_env``), never for
a loopback host. TLS uses the ``ssl.SSLContext`` from the options, or the system's trust store.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import os
import platform
import ssl as _ssl
import time
import urllib.request
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

import aiohttp
import attrs

from ._config import is_loopback
from ._version import __version__
from .exceptions import (
    AuthenticationError,
    CertificateError,
    DeliveryError,
    HTTPStatusError,
    PayloadTooLargeError,
    PermanentStatusError,
    RedirectError,
    RejectedError,
    RetryableStatusError,
    TransportError,
)

__all__ = [
    "USER_AGENT",
    "ProxyRoute",
    "Transport",
    "classify_status",
    "parse_retry_after",
    "resolve_proxy",
]

log = logging.getLogger("telemetrydeck_async")

USER_AGENT = (
    f"telemetrydeck-async/{__version__} aiohttp/{aiohttp.__version__} "
    f"Python/{platform.python_version()}"
)

#: How much of an error answer is read and kept for logs.
MAX_RESPONSE_BYTES = 4096

_PERMANENT_5XX = frozenset({501, 505})


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # Python 3.10 returns None for some unparsable dates
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify_status(
    status: int, body: str, retry_after: float | None, location: str | None = None
) -> HTTPStatusError | None:
    """The error a status stands for, or None for success (any 2xx).

    ``location``: the ``Location`` header of a 3xx answer, kept on the :class:`RedirectError`.
    """
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return RedirectError(status, body, location)
    if status == 413:
        return PayloadTooLargeError(status, body)
    if status in (400, 422):
        return RejectedError(status, body)
    if status in (401, 403, 404):
        return AuthenticationError(status, body)
    if status in (408, 429) or (status >= 500 and status not in _PERMANENT_5XX):
        return RetryableStatusError(status, body, retry_after)
    return PermanentStatusError(status, body)


@attrs.frozen
class ProxyRoute:
    """A proxy to send through: its URL without credentials, and the credentials apart.

    Kept apart so the URL can be logged and the password never is.
    """

    url: str
    #: ``Proxy-Authorization`` when the URL had credentials (sent with the CONNECT request).
    headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    #: Where the choice came from: ``"proxy="`` or the environment variable's name.
    source: str = "proxy="


def split_proxy_url(url: str, source: str) -> ProxyRoute:
    """``http://user:pass@host:port`` -> a route with the credentials as a Basic header."""
    parts = urlsplit(url)
    headers = {}
    if parts.username is not None:
        # Built here rather than with aiohttp.BasicAuth, deprecated in newer aiohttp.
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return ProxyRoute(f"{parts.scheme}://{netloc}", headers, source)


def resolve_proxy(
    url: str,
    proxy: str | None,
    *,
    trust_env: bool,
    environ: Mapping[str, str] | None = None,
) -> ProxyRoute | None:
    """The proxy a request to ``url`` goes through, or None for a direct connection.

    Loopback hosts are always reached directly (the local emulator, a sidecar). An explicit
    ``proxy`` wins over the environment; with ``trust_env`` the standard variables are read
    as ``requests`` and ``httpx`` read them (lower case first, ``NO_PROXY`` honoured).
    """
    target = urlsplit(url)
    if is_loopback(target.hostname or ""):
        return None
    if proxy is not None:
        return split_proxy_url(proxy, "proxy=")
    if not trust_env:
        return None
    # Read here once per session rather than through aiohttp's trust_env, which repeats the
    # lookup (and a ~/.netrc read for the endpoint's credentials) on a thread for every request.
    found = _proxy_variables(os.environ if environ is None else environ)
    chosen = found.get(target.scheme)
    if not chosen:
        return None
    # The standard library's NO_PROXY rule, the one requests builds on: comma-separated
    # hosts and domain suffixes, optional ports, "*" for everything.
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # public, untyped
    if "no" in found and bypass(target.hostname or "", found):
        return None
    variable = f"{target.scheme.upper()}_PROXY"
    if urlsplit(chosen).scheme != "http":
        log.warning(
            "ignoring %s: only http:// proxy URLs are supported (TLS to the endpoint still "
            "goes through the proxy's CONNECT tunnel); connecting directly",
            variable,
        )
        return None
    return split_proxy_url(chosen, variable)


def _proxy_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """``{"https": ..., "http": ..., "no": ...}`` from ``*_PROXY`` variables, as urllib reads them.

    The lower-case spelling wins over the upper-case one; under CGI (``REQUEST_METHOD`` set)
    ``HTTP_PROXY`` is ignored, because a client's ``Proxy:`` header arrives as that variable.
    """
    found: dict[str, str] = {}
    for name, value in environ.items():
        if value and name.lower().endswith("_proxy") and not name.islower():
            found[name[:-6].lower()] = value
    for name, value in environ.items():
        if value and name.endswith("_proxy") and name.islower():
            found[name[:-6]] = value
    if "REQUEST_METHOD" in environ and environ.get("http_proxy") is None:
        found.pop("http", None)
    return found


@attrs.define
class Transport:
    """POSTs encoded batches to one endpoint over a reused keep-alive session.

    The session is created lazily inside the running loop (aiohttp binds it to that loop).
    """

    url: str
    timeout: float
    max_connections: int = 2
    #: An explicit proxy URL (credentials allowed); wins over the environment.
    proxy: str | None = attrs.field(default=None, repr=False)
    #: None: the system's trust store with full verification.
    ssl: _ssl.SSLContext | None = None
    #: Read HTTPS_PROXY / HTTP_PROXY / NO_PROXY.
    trust_env: bool = True
    _session: aiohttp.ClientSession | None = attrs.field(default=None, init=False)
    _route: ProxyRoute | None = attrs.field(default=None, init=False)

    def _open(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            self._route = route = resolve_proxy(self.url, self.proxy, trust_env=self.trust_env)
            if route is not None:
                log.debug("sending through the proxy %s (from %s)", route.url, route.source)
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.max_connections,
                    ssl=self.ssl if self.ssl is not None else True,
                ),
                # The proxy is chosen above; aiohttp's own environment reading stays off.
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={
                    "Content-Type": "application/json; charset=utf-8",
                    "User-Agent": USER_AGENT,
                },
            )
            self._session = session
        return session

    async def send(self, body: bytes) -> None:
        """POST one JSON-array body; return on 2xx, raise a ``DeliveryError`` otherwise."""
        session = self._open()
        try:
            # No redirects for a POST of telemetry: a redirect means a wrong base_url, and
            # following it would resend the body somewhere unexpected (RedirectError).
            route = self._route
            async with session.post(
                self.url,
                data=body,
                allow_redirects=False,
                proxy=route.url if route is not None else None,
                proxy_headers=route.headers if route is not None else None,
            ) as response:
                if 200 <= response.status < 300:
                    return
                raw = await response.content.read(MAX_RESPONSE_BYTES)
                headers = response.headers
                error = classify_status(
                    response.status,
                    raw.decode("utf-8", "replace").strip(),
                    parse_retry_after(headers.get("Retry-After")),
                    headers.get("Location"),
                )
        except DeliveryError:
            raise
        except aiohttp.ClientConnectorCertificateError as exc:
            raise CertificateError(
                f"the TLS certificate of {exc.host} could not be verified "
                f"({exc.certificate_error}); behind a TLS-inspecting proxy or with a private "
                "CA, pass its CA bundle as ssl= (a file path or an ssl.SSLContext)"
            ) from exc
        except asyncio.TimeoutError as exc:
            raise TransportError(f"no answer within {self.timeout:g} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        assert error is not None  # 2xx returned above
        raise error

    async def close(self) -> None:
        """Close the session and its connections; idempotent."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
