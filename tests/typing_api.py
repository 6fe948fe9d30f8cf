"""The public API as users write it, checked by ``mypy --strict`` in CI.

This file is not a test module (pytest does not collect it); ``.ci/run`` type-checks it, and
``test_public_api.py`` runs :func:`main` against the emulator so it is right at run time too.
If a change to the package makes ordinary user code fail to type-check, this file fails first.

Lines marked ``# type: ignore[code]`` are misuse that mypy must keep rejecting: with
``--strict`` (``warn_unused_ignores``), an ignore that is no longer needed is itself an error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from typing_extensions import assert_type

import telemetrydeck_async
from telemetrydeck_async import (
    DEFAULT_BASE_URL,
    DROP_REASONS,
    ClientClosedError,
    ConfigurationError,
    DeliveryError,
    FlushResult,
    HTTPStatusError,
    InvalidSignalError,
    LastError,
    RetryPolicy,
    Stats,
    TelemetryClient,
    TelemetryDeckError,
)
from telemetrydeck_async.devserver import FaultPlan, IngestEmulator

log = logging.getLogger(__name__)


def on_drop(signals: Sequence[Mapping[str, Any]], reason: str) -> None:
    """A user's drop callback: the dropped signals as JSON objects, and why."""
    log.warning("dropped %d signal(s): %s", len(signals), reason)


def on_error(exc: BaseException) -> None:
    """A user's error callback: status codes are there for HTTP errors."""
    if isinstance(exc, HTTPStatusError):
        assert_type(exc.status, int)
        assert_type(exc.retry_after, float | None)
    if isinstance(exc, DeliveryError):
        assert_type(exc.retryable, bool)


def build_client(base_url: str) -> TelemetryClient:
    """Every constructor option, spelled as a user would."""
    return TelemetryClient(
        "APP-ID",
        namespace="com.example",
        base_url=base_url,
        salt="a-long-random-salt",
        default_user="service-account",
        session_id="session-1",
        test_mode=True,
        default_payload={"App.region": "eu", "App.build": 42, "App.beta": False, "App.x": 1.5},
        batch_size=50,
        max_batch_bytes=512 * 1024,
        flush_interval=0.2,
        max_queue_size=1_000,
        request_timeout=5.0,
        close_timeout=5.0,
        max_concurrent_requests=1,
        retry=RetryPolicy(initial_backoff=0.05, max_backoff=1.0, deadline=10.0),
        spool_dir=None,
        on_drop=on_drop,
        on_error=on_error,
    )


async def send_some(td: TelemetryClient) -> FlushResult:
    """Signals of every shape the API accepts, then a flush."""
    await td.signal("App.launched")
    await td.signal(
        "Checkout.Payment.completed",
        client_user="user-42",
        session_id="session-2",
        payload={"Cart.items": 3, "Cart.coupon": True, "Cart.currency": "EUR", "Cart.skip": None},
        float_value=19.99,
        test_mode=False,
    )
    td.signal_nowait("App.ping", client_user="user-42", float_value=3)
    result = await td.flush(timeout=10)
    assert_type(result.sent, int)
    assert_type(result.dropped, Mapping[str, int])
    assert_type(result.dropped_total, int)
    return result


def read_stats(stats: Stats) -> int:
    """The counters a health check or a metrics exporter reads."""
    assert_type(stats.enqueued, int)
    assert_type(stats.pending, int)
    last: LastError | None = stats.last_error
    if last is not None:
        assert_type(last.message, str)
    for reason in DROP_REASONS:
        assert_type(stats.dropped.get(reason, 0), int)
    return stats.sent


async def handle_errors(td: TelemetryClient) -> None:
    """The errors a caller can meet, caught the way the docs suggest."""
    try:
        await td.signal("App.bad", payload={"Nested": {"no": 1}})
    except InvalidSignalError as exc:
        assert_type(exc.field, str)
        assert_type(exc.reason, str)
    try:
        TelemetryClient("APP-ID", namespace="not a namespace")
    except ConfigurationError as exc:
        assert_type(exc.option, str)
    except TelemetryDeckError:
        raise


async def misuse(td: TelemetryClient) -> None:
    """Calls mypy must reject; never run."""
    await td.signal(42)  # type: ignore[arg-type]  # the type must be a str
    await td.signal("A.b", payload=[("k", 1)])  # type: ignore[arg-type]  # not a mapping
    await td.signal("A.b", float_value="1.5")  # type: ignore[arg-type]  # not a number
    await td.signal("A.b", "user")  # type: ignore[call-arg]  # options are keyword-only
    TelemetryClient("APP-ID", batch_size="100")  # type: ignore[arg-type]  # not an int
    td.stats.sent = 0  # type: ignore[misc]  # Stats is a frozen snapshot


def use_sync_client(base_url: str) -> FlushResult:
    """The synchronous client, as a Django view, a script or a Lambda handler uses it."""
    with telemetrydeck_async.SyncTelemetryClient("APP-ID", base_url=base_url) as td:
        assert_type(td.signal("App.Job.done", payload={"Job.rows": 3}), None)
        assert_type(td.error(ValueError("x"), category="app-state"), None)
        assert_type(td.purchase_completed(9.99, purchase_type="subscription"), None)
        assert_type(td.new_session(), str)
        with td.duration("App.Job.timed"):
            pass

        @td.flush_after
        def handler(event: dict[str, str], context: object) -> int:
            return len(event)

        assert_type(handler({}, None), int)
        td.navigation("/a", 3)  # type: ignore[arg-type]
        return td.flush(timeout=1.0)


async def main(base_url: str) -> int:
    """Run the typed usage against ``base_url``; return how many signals were sent."""
    assert_type(telemetrydeck_async.__version__, str)
    assert DEFAULT_BASE_URL.startswith("https://")
    async with build_client(base_url) as td:
        result = await send_some(td)
        await handle_errors(td)
        sent = read_stats(td.stats)
        assert result.sent == sent
    assert td.closed
    try:
        await td.signal("App.late")
    except ClientClosedError as exc:
        assert_type(exc, ClientClosedError)
    else:
        raise AssertionError("a closed client must refuse signals")
    closed: FlushResult = await td.aclose()  # idempotent
    return sent + closed.sent


async def with_own_emulator() -> int:
    """The emulator as a user's test suite starts it, with a fault injected."""
    async with IngestEmulator(faults=FaultPlan(fail_next=1)) as emulator:
        emulator.faults.fail_next = 2
        sent = await main(emulator.base_url)
        assert len(emulator.signals) == sent
        return sent


if __name__ == "__main__":
    print(asyncio.run(with_own_emulator()))
