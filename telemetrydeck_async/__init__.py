"""telemetrydeck-async: an asyncio SDK for the TelemetryDeck Ingest API v2.

Signals are validated at the call, queued in memory, and sent in batches by a background task
with retries, backoff and an optional on-disk spool::

    from telemetrydeck_async import TelemetryClient

    async with TelemetryClient("APP-ID", namespace="com.example", salt="...") as td:
        await td.signal("Checkout.Payment.completed", client_user="user-42", float_value=19.99)
"""

from ._client import TelemetryClient
from ._config import DEFAULT_BASE_URL, ClientConfig
from ._presets import Duration, ErrorCategory, PurchaseType
from ._retry import RetryPolicy
from ._stats import DROP_REASONS, FlushResult, LastError, Stats
from ._sync import SyncTelemetryClient
from ._version import __version__
from .exceptions import (
    AuthenticationError,
    CertificateError,
    ClientClosedError,
    ConfigurationError,
    DeliveryError,
    HTTPStatusError,
    InvalidSignalError,
    PayloadTooLargeError,
    PermanentStatusError,
    RedirectError,
    RejectedError,
    RetryableStatusError,
    SpoolError,
    TelemetryDeckError,
    TransportError,
    WrongEventLoopError,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "DROP_REASONS",
    "AuthenticationError",
    "CertificateError",
    "ClientClosedError",
    "ClientConfig",
    "ConfigurationError",
    "DeliveryError",
    "Duration",
    "ErrorCategory",
    "FlushResult",
    "HTTPStatusError",
    "InvalidSignalError",
    "LastError",
    "PayloadTooLargeError",
    "PermanentStatusError",
    "PurchaseType",
    "RedirectError",
    "RejectedError",
    "RetryPolicy",
    "RetryableStatusError",
    "SpoolError",
    "Stats",
    "SyncTelemetryClient",
    "TelemetryClient",
    "TelemetryDeckError",
    "TransportError",
    "WrongEventLoopError",
    "__version__",
]
