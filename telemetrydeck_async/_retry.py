"""The retry policy: when a failed request is sent again, and how long to wait before it.

tenacity is imported here and nowhere else: it gives us tested exponential backoff with full
jitter, stop conditions and an async loop, so we don't hand-roll them. The knobs users see are
our own (:class:`RetryPolicy`), so tenacity's API can change without changing ours.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import tenacity as _t

from .exceptions import ConfigurationError, DeliveryError

__all__ = ["RetryPolicy", "retry_call"]

T = TypeVar("T")


def _positive(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ConfigurationError(f"RetryPolicy.{attr.name}", f"must be > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How the client retries a batch whose request failed.

    Retried: connection errors, timeouts, HTTP 408, 429 and 5xx except 501/505.
    The wait before attempt *n* is drawn uniformly from ``[0, min(max_backoff,
    initial_backoff * 2**n)]`` (exponential backoff with full jitter), and is never shorter than
    the server's ``Retry-After`` (itself capped at ``max_backoff``).

    Attributes:
        initial_backoff: seconds; the scale of the first waits (default 1 s).
        max_backoff: seconds; no single wait is longer (default 30 s).
        deadline: seconds a batch may spend being retried before it is spooled, or dropped with
            reason ``retries_exhausted`` when no spool is configured (default 120 s).
        auth_probe_interval: seconds between probes while the endpoint refuses the app ID or
            namespace with 401/403/404 (default 300 s): a misconfigured client must not
            hammer the endpoint.
    """

    initial_backoff: float = attrs.field(default=1.0, validator=_positive)
    max_backoff: float = attrs.field(default=30.0, validator=_positive)
    deadline: float = attrs.field(default=120.0, validator=_positive)
    auth_probe_interval: float = attrs.field(default=300.0, validator=_positive)

    def retry_after_wait(self, retry_after: float | None) -> float:
        """The minimum wait a server asked for, clamped to ``max_backoff``."""
        if retry_after is None or retry_after <= 0:
            return 0.0
        return min(retry_after, self.max_backoff)


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, DeliveryError) and exc.retryable


class _WaitHonouringRetryAfter(_t.wait.wait_base):
    """Full-jitter exponential wait, but never shorter than the server's Retry-After."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._jitter = _t.wait_random_exponential(
            multiplier=policy.initial_backoff, max=policy.max_backoff
        )

    def __call__(self, retry_state: _t.RetryCallState) -> float:
        wait = self._jitter(retry_state)
        outcome = retry_state.outcome
        if outcome is not None and outcome.failed:
            exc = outcome.exception()
            wait = max(wait, self._policy.retry_after_wait(getattr(exc, "retry_after", None)))
        return wait


async def retry_call(
    policy: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
    *,
    sleep: Callable[[float], Awaitable[None]],
    deadline: float | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Run ``attempt`` until it succeeds, raises a non-retryable error, or the deadline passes.

    ``sleep`` is the client's interruptible sleep: closing the client wakes it with an exception,
    so shutdown never waits out a backoff. The last error is re-raised when retrying stops.
    ``on_retry(exc, wait)`` is called before each wait (for counters and logs).
    """
    # The first attempt runs outside tenacity: nearly every request succeeds at once, and
    # setting up a retry loop (its state, stop, wait and retry objects) cost more than the
    # request's own Python work (benchmarks/: ~60 us per request). Only a retryable failure
    # enters the loop, which then sees that failure as its first attempt.
    started = time.monotonic()
    try:
        return await attempt()
    except Exception as exc:
        if not _is_retryable(exc):
            raise
        first: BaseException | None = exc
    budget = policy.deadline if deadline is None else deadline
    # The first attempt's time counts against the deadline, as it did inside the loop.
    budget -= time.monotonic() - started

    def before_sleep(state: _t.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc, state.next_action.sleep)

    retrying = _t.AsyncRetrying(
        sleep=sleep,
        # stop_before_delay: give up rather than start a wait that would end past the deadline.
        stop=_t.stop_before_delay(budget),
        wait=_WaitHonouringRetryAfter(policy),
        retry=_t.retry_if_exception(_is_retryable),
        before_sleep=before_sleep,
        reraise=True,
    )

    # A named coroutine function: tenacity decides between sync and async calling by
    # inspecting the callable, and a lambda returning a coroutine would look synchronous.
    async def call() -> T:
        nonlocal first
        if first is not None:
            # The loop's first attempt is the one already made: hand tenacity its failure.
            failed, first = first, None
            raise failed
        return await attempt()

    return await retrying(call)
