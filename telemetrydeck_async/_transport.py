"""The HTTP edge: one aiohttp session per client, and the only place that knows aiohttp.

Every way a request can fail is translated here, in one place, into the package's own
:class:`~telemetrydeck_async.exceptions.DeliveryError` classes; the delivery policy above reads
only those. Answers are read up to a small limit, so a misbehaving server cannot make the
client buffer megabytes.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import platform
import time

import aiohttp
import attrs

from ._version import __version__
from .exceptions import (
    AuthenticationError,
    DeliveryError,
    HTTPStatusError,
    PayloadTooLargeError,
    PermanentStatusError,
    RedirectError,
    RejectedError,
    RetryableStatusError,
    TransportError,
)

__all__ = ["USER_AGENT", "Transport", "classify_status", "parse_retry_after"]

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


@attrs.define
class Transport:
    """POSTs encoded batches to one endpoint over a reused keep-alive session.

    The session is created lazily inside the running loop (aiohttp binds it to that loop).
    """

    url: str
    timeout: float
    max_connections: int = 2
    _session: aiohttp.ClientSession | None = attrs.field(default=None, init=False)

    def _open(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
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
            async with session.post(self.url, data=body, allow_redirects=False) as response:
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
