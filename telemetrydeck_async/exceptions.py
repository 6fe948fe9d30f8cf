"""The errors telemetrydeck-async can raise or report.

Every error is a :class:`TelemetryDeckError`, so one ``except`` clause catches them all::

    TelemetryDeckError
    ├── ConfigurationError            (also ValueError)   bad constructor argument
    ├── InvalidSignalError            (also ValueError)   bad signal() argument; nothing queued
    ├── ClientClosedError             (also RuntimeError) the client was closed
    ├── WrongEventLoopError           (also RuntimeError) the client is bound to another loop
    ├── SpoolError                    (also OSError)      the on-disk spool could not be used
    └── DeliveryError                                     one request failed (reported, not raised)
        ├── TransportError                                connection refused/reset, timeout
        │   └── CertificateError                          TLS certificate not trusted: kept
        └── HTTPStatusError                               the server answered with a non-2xx status
            ├── RetryableStatusError                      408, 429, 5xx except 501/505
            ├── PayloadTooLargeError                      413: the batch is split and resent
            ├── RejectedError                             400, 422: the server refused a signal
            ├── AuthenticationError                       401, 403, 404: wrong app ID or namespace
            │   └── RedirectError                         3xx: wrong base_url (never followed)
            └── PermanentStatusError                      any other status not worth repeating

Whether a failed request is worth repeating is a property of its error class
(:attr:`DeliveryError.retryable`); the delivery policy reads it and nothing else.
Delivery errors are never raised into the caller's code: the background flusher handles them
and reports them through ``stats.last_error``, the ``on_error`` callback and the log.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "CertificateError",
    "ClientClosedError",
    "ConfigurationError",
    "DeliveryError",
    "HTTPStatusError",
    "InvalidSignalError",
    "PayloadTooLargeError",
    "PermanentStatusError",
    "RedirectError",
    "RejectedError",
    "RetryableStatusError",
    "SpoolError",
    "TelemetryDeckError",
    "TransportError",
    "WrongEventLoopError",
]


class TelemetryDeckError(Exception):
    """Base class of every error this package raises or reports."""


class ConfigurationError(TelemetryDeckError, ValueError):
    """A client option is invalid; the message names the option and what to pass instead."""

    def __init__(self, option: str, reason: str) -> None:
        self.option = option
        self.reason = reason
        super().__init__(f"invalid option {option!r}: {reason}")


class InvalidSignalError(TelemetryDeckError, ValueError):
    """A signal was refused before it was enqueued.

    ``field`` names the offending argument or payload key, ``reason`` says what is wrong.
    Nothing was enqueued and the client stays usable.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid signal field {field!r}: {reason}")


class ClientClosedError(TelemetryDeckError, RuntimeError):
    """The client was closed with ``aclose()``; create a new client to send more signals."""


class WrongEventLoopError(TelemetryDeckError, RuntimeError):
    """The client was used from an event loop other than the one it started on.

    A client owns an aiohttp session and a background task, both bound to one loop.
    Create one client per event loop (for example, one per worker process).
    """


class SpoolError(TelemetryDeckError, OSError):
    """The on-disk spool could not be opened, read or written.

    The client logs this once and carries on memory-only; it is never raised into ``signal()``.
    """


class DeliveryError(TelemetryDeckError):
    """One request to the ingest endpoint failed.

    ``retryable`` says whether sending the same batch again may succeed.
    """

    retryable: bool = False


class TransportError(DeliveryError):
    """The request did not get an answer: connection refused or reset, DNS, timeout."""

    retryable = True


class CertificateError(TransportError):
    """The server's TLS certificate could not be verified (unknown CA, wrong host name, expired).

    Sending again will not help until the trust is fixed: like :class:`AuthenticationError`,
    signals are kept (in memory, or in the spool) and the endpoint is probed on a long
    interval. Behind a TLS-inspecting proxy or with a private CA, pass the CA bundle as
    ``ssl=`` (a path or an ``ssl.SSLContext``).
    """

    retryable = False


class HTTPStatusError(DeliveryError):
    """The server answered with a status that is not 2xx.

    ``status`` is the HTTP status, ``body`` the first bytes of the answer (decoded, for logs),
    ``retry_after`` the server's ``Retry-After`` in seconds when it sent a usable one.
    """

    def __init__(self, status: int, body: str = "", retry_after: float | None = None) -> None:
        self.status = status
        self.body = body
        self.retry_after = retry_after
        detail = f": {body}" if body else ""
        super().__init__(f"ingest endpoint answered HTTP {status}{detail}")


class RetryableStatusError(HTTPStatusError):
    """408, 429 or a 5xx other than 501/505: the same request may succeed later."""

    retryable = True


class PayloadTooLargeError(HTTPStatusError):
    """413: the body was too large. The batch is split in halves and each half resent."""


class RejectedError(HTTPStatusError):
    """400 or 422: the server refused the body. The batch is bisected to find the bad signals."""


class AuthenticationError(HTTPStatusError):
    """401, 403 or 404: the app ID or namespace is wrong, or the endpoint does not exist.

    The family of configuration errors the server reports (:class:`RedirectError` for 3xx).

    Signals are kept (in memory, or in the spool) and the endpoint is probed on a long interval.
    """


class RedirectError(AuthenticationError):
    """3xx: the endpoint answered with a redirect, which is never followed.

    Following it would send the signals to another place than the configured ``base_url``.
    It almost always means the ``base_url`` is wrong (``http://`` instead of ``https://``, a
    moved host, a missing path). Like the other configuration errors the signals are kept
    (in memory, or in the spool), one ERROR names the ``Location`` and the endpoint is probed
    every ``auth_probe_interval``. ``location`` is the answer's ``Location`` header, or None.
    """

    def __init__(self, status: int, body: str = "", location: str | None = None) -> None:
        super().__init__(status, body)
        self.location = location
        self.args = (f"ingest endpoint answered HTTP {status}, a redirect to {location or '?'}",)


class PermanentStatusError(HTTPStatusError):
    """Any other non-2xx status (for example 501 or 505): repeating the request will not help."""
