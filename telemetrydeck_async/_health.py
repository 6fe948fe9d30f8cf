"""The ingest endpoint's health as the flusher sees it: one small state object, one rule.

Three facts, each set by an answer and cleared by another:

* a **pause** (429 or 503, ``Retry-After`` honoured): every request waits until it ends;
* a **refusal** (401/403/404, a redirect, a certificate the client cannot trust): nothing is
  sent but one probe every ``auth_probe_interval``, until a 2xx;
* **failing**: a request failed since the last 2xx (a retry is under way).

:meth:`EndpointHealth.may_send` is the one rule that turns them into "may a request go now";
the flusher's ``healthy`` and the spool link's recovery both ask it. To add a pause rule,
this is the file to open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import attrs

from ._config import ClientConfig
from ._stats import Accounting
from .exceptions import (
    AuthenticationError,
    CertificateError,
    RedirectError,
    RetryableStatusError,
)

__all__ = ["PAUSING_STATUSES", "EndpointHealth", "describe_wait"]

log = logging.getLogger("telemetrydeck_async")

# Statuses that mean "the server as a whole is overloaded": every request waits, not just one.
PAUSING_STATUSES = frozenset({429, 503})


def describe_wait(seconds: float) -> str:
    """A wait for people: ``"40 ms"`` below a second (never ``"0.0 s"``), else ``"2.5 s"``."""
    if seconds < 0.0005:
        return "under 1 ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


@attrs.define(eq=False)
class EndpointHealth:
    """Pause, refusal and failure of the ingest endpoint, and the rule that reads them."""

    config: ClientConfig
    accounting: Accounting
    #: ``time.monotonic()`` until which every request waits (429/503).
    _pause_until: float = attrs.field(default=0.0, init=False)
    #: When the endpoint last refused the configuration; None while it does not.
    _refused_at: float | None = attrs.field(default=None, init=False)
    _failing: bool = attrs.field(default=False, init=False)

    # ----------------------------------------------------------------------------- the rule

    def may_send(self, *, alone: bool) -> bool:
        """May a request go now? ``alone``: nothing else of this client is in flight.

        Not while paused. While the endpoint refuses, only a probe: when one is due and
        nothing else is in flight. After a failure, one request at a time tests the endpoint
        (nothing else in flight); a 2xx resumes the full pace. ``may_send(alone=False)`` is
        therefore "healthy": requests may go at full pace.
        """
        if self._pause_until > time.monotonic():
            return False
        if self._refused_at is not None and not (alone and self.probe_due()):
            return False
        return alone or not self._failing

    @property
    def refusing(self) -> bool:
        """True while the endpoint answers 401/403/404, 3xx or fails TLS (until a 2xx)."""
        return self._refused_at is not None

    def probe_due(self) -> bool:
        """True unless refusing and the last refusal is younger than ``auth_probe_interval``."""
        return self.probe_wait() <= 0.0

    def probe_wait(self) -> float:
        """Seconds until the next probe may go (0 or less: now; 0 when not refusing)."""
        if self._refused_at is None:
            return 0.0
        interval = self.config.retry.auth_probe_interval
        return interval - (time.monotonic() - self._refused_at)

    # ----------------------------------------------------------------------------- pause

    def pause(self, exc: RetryableStatusError) -> None:
        """The server is overloaded (429/503): every request waits ``Retry-After`` or a backoff."""
        policy = self.config.retry
        wait = policy.retry_after_wait(exc.retry_after) or policy.initial_backoff
        until = time.monotonic() + wait
        if until > self._pause_until:
            self._pause_until = until
            self.accounting.warnings.log(
                logging.WARNING,
                "pause",
                "ingest endpoint answered %d; pausing all requests for %s",
                exc.status,
                describe_wait(wait),
            )

    async def wait_out_pause(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        """Sleep until no pause is in force (a closing client cancels the wait)."""
        while (left := self._pause_until - time.monotonic()) > 0:
            await sleep(left)

    # ----------------------------------------------------------------------------- answers

    def on_failure(self) -> None:
        """A request failed and will be retried: one request at a time until a 2xx."""
        self._failing = True

    def on_refused(self, exc: AuthenticationError | CertificateError, url: str) -> None:
        """The endpoint refused the configuration: log once why, then probe."""
        config = self.config
        if self._refused_at is not None:
            pass
        elif isinstance(exc, CertificateError):
            log.error(
                "%s. Signals are kept and the endpoint will be probed every %g s.",
                exc,
                config.retry.auth_probe_interval,
            )
        elif isinstance(exc, RedirectError):
            log.error(
                "the ingest endpoint %s answered HTTP %d, a redirect to %s. Redirects are never "
                "followed (the signals would go elsewhere): check base_url (https:// rather "
                "than http://, the host, no extra path). Signals are kept and the endpoint will "
                "be probed every %g s.",
                url,
                exc.status,
                exc.location or "(no Location header)",
                config.retry.auth_probe_interval,
            )
        else:
            log.error(
                "the ingest endpoint refused app ID %r (namespace %r) with HTTP %d: check the "
                "app ID and namespace in the TelemetryDeck dashboard. Signals are kept and the "
                "endpoint will be probed every %g s.",
                config.app_id,
                config.namespace,
                exc.status,
                config.retry.auth_probe_interval,
            )
        self._refused_at = time.monotonic()

    def on_success(self) -> None:
        """A 2xx: no longer failing, no longer refused."""
        self._failing = False
        if self._refused_at is not None:
            log.info("the ingest endpoint accepts signals again")
            self._refused_at = None
