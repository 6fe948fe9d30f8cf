"""Delivery under faults: every accepted signal ends sent, spooled or dropped with a reason.

Each case of the fault matrix sends N signals, each with a unique ``Test.id``, through a real
client to the emulator on loopback, and checks the exact outcome and that the books balance.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
import tracemalloc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from telemetrydeck_async import RetryPolicy, TelemetryClient
from telemetrydeck_async._stats import RateLimitedLog
from telemetrydeck_async._transport import classify_status, parse_retry_after
from telemetrydeck_async.devserver import IngestEmulator
from telemetrydeck_async.exceptions import (
    AuthenticationError,
    PayloadTooLargeError,
    PermanentStatusError,
    RedirectError,
    RejectedError,
    RetryableStatusError,
)
from tests.helpers import FAST_RETRY, ClientFactory, balanced, spool_client

#: Part of the fast core CI also runs on the installed wheel (oldest and newest Python).
pytestmark = pytest.mark.core

N = 5000

# The books are read at every turn of the event loop in every case, not only at the end.
pytestmark = pytest.mark.usefixtures("books_watch")


async def send_numbered(
    td: TelemetryClient, n: int = N, *, poison_every: int | None = None, nowait: bool = False
) -> None:
    """Send ``n`` signals with ``Test.id`` 0..n-1; every ``poison_every``-th carries a marker."""
    for i in range(n):
        payload: dict[str, Any] = {"Test.id": i}
        if poison_every and i % poison_every == 7:
            payload["Test.poison"] = True
        if nowait:
            td.signal_nowait("Fault.case", payload=payload)
        else:
            await td.signal("Fault.case", payload=payload)


def assert_books_balance(td: TelemetryClient) -> None:
    """enqueued == sent + spooled + dropped + pending, and nothing is pending."""
    stats = td.stats
    assert stats.pending == 0, stats
    assert stats.enqueued == stats.sent + stats.spooled + stats.dropped_total, stats


async def test_503_bursts_are_retried_until_everything_arrives(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A third of requests answered 503: all N signals arrive exactly once."""
    emulator.faults.fail_fraction = 0.3
    emulator.faults.seed = 7
    td = make_client(max_queue_size=N)
    await send_numbered(td)
    result = await td.flush()
    assert result.sent == N
    assert emulator.distinct_ids() == set(range(N))
    assert emulator.duplicates() == 0
    assert td.stats.retried_requests > 0
    assert_books_balance(td)


async def test_429_retry_after_pauses_every_request(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """After a 429 with Retry-After: 1, no request reaches the server before a second passed."""
    emulator.faults.update({"fail_next": 1, "fail_status": 429, "retry_after": "1"})
    td = make_client(
        max_queue_size=N,
        max_concurrent_requests=1,
        retry=RetryPolicy(initial_backoff=0.01, max_backoff=2.0, deadline=30.0),
    )
    await send_numbered(td, 1000)
    await td.flush()
    first, *later = emulator.requests
    assert first.status == 429
    assert later
    assert min(r.time for r in later) - first.time >= 0.95
    assert emulator.distinct_ids() == set(range(1000))
    assert_books_balance(td)


async def test_connection_resets_are_retried(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Ten connections reset before the body is read: everything arrives, no duplicates."""
    emulator.faults.reset_next = 10
    td = make_client(max_queue_size=N)
    await send_numbered(td)
    await td.flush()
    assert emulator.distinct_ids() == set(range(N))
    assert emulator.duplicates() == 0
    assert td.stats.sent == N
    assert_books_balance(td)


async def test_request_timeouts_are_retried(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Two requests never answered: the client times out, retries, and everything arrives."""
    emulator.faults.update({"stall_next": 2, "stall_seconds": 10.0})
    td = make_client(max_queue_size=N, request_timeout=1.0)
    await send_numbered(td)
    await td.flush()
    assert emulator.distinct_ids() == set(range(N))
    assert emulator.duplicates() == 0
    assert td.stats.last_error is not None
    assert td.stats.last_error.type == "TransportError"
    assert_books_balance(td)


async def test_slow_server_still_gets_everything(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Every answer delayed by 20 ms: batching keeps up and nothing is lost."""
    emulator.faults.delay = 0.02
    td = make_client(max_queue_size=N)
    await send_numbered(td)
    await td.flush()
    assert emulator.distinct_ids() == set(range(N))
    assert_books_balance(td)


async def test_413_splits_batches_until_they_fit(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Bodies above 3,000 bytes get 413: batches are halved until they fit, none dropped."""
    emulator.faults.max_body_bytes = 3000
    td = make_client(max_queue_size=N)
    await send_numbered(td)
    result = await td.flush()
    assert result.sent == N
    assert result.dropped == {}
    accepted = [r for r in emulator.requests if r.status == 200]
    assert all(r.body_bytes <= 3000 for r in accepted)
    assert any(r.status == 413 for r in emulator.requests)
    assert emulator.distinct_ids() == set(range(N))
    assert_books_balance(td)


async def test_lone_signal_still_too_large_is_dropped_as_oversize(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """When even one signal gets 413, it is dropped with reason oversize, not retried forever."""
    emulator.faults.max_body_bytes = 50
    dropped: list[tuple[int, str]] = []
    td = make_client(on_drop=lambda sigs, why: dropped.extend((len(sigs), why) for _ in [0]))
    await send_numbered(td, 20)
    result = await td.flush()
    assert result.dropped == {"oversize": 20}
    assert sum(n for n, _ in dropped) == 20
    assert {why for _, why in dropped} == {"oversize"}
    assert_books_balance(td)


async def test_poisoned_signals_are_isolated_and_the_rest_delivered(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """One rejected signal per 100: bisection delivers the other 99, drops only the bad ones."""
    emulator.faults.reject_marker = "Test.poison"
    dropped_ids: list[int] = []
    reasons: set[str] = set()

    def on_drop(signals: Sequence[Mapping[str, Any]], reason: str) -> None:
        reasons.add(reason)
        dropped_ids.extend(s["payload"]["Test.id"] for s in signals)

    td = make_client(max_queue_size=N, on_drop=on_drop)
    await send_numbered(td, poison_every=100)
    result = await td.flush()
    poisoned = {i for i in range(N) if i % 100 == 7}
    assert result.dropped == {"rejected": len(poisoned)}
    assert set(dropped_ids) == poisoned
    assert reasons == {"rejected"}
    assert emulator.distinct_ids() == set(range(N)) - poisoned
    assert emulator.duplicates() == 0
    assert_books_balance(td)


async def test_401_keeps_signals_logs_once_and_probes_slowly(
    make_client: ClientFactory, emulator: IngestEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong app ID: nothing dropped, one ERROR, few requests; all sent once it is fixed."""
    caplog.set_level(logging.WARNING, logger="telemetrydeck_async")
    emulator.faults.status_always = 401
    td = make_client(
        max_queue_size=N,
        retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.05, auth_probe_interval=0.5),
    )
    await send_numbered(td)
    refused = await td.flush()
    assert refused.dropped == {}
    assert refused.pending == N
    await asyncio.sleep(1.5)
    # Without the slow probe the client would have made hundreds of requests by now.
    assert len(emulator.requests) <= 8
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "app ID" in errors[0].getMessage()
    assert td.stats.dropped_total == 0
    emulator.faults.status_always = None
    assert await emulator.wait_for_signals(N, timeout=30)
    await td.flush()
    assert emulator.distinct_ids() == set(range(N))
    assert td.stats.sent == N
    assert_books_balance(td)


async def test_lost_answer_after_accept_is_resent_and_counted_as_duplicate(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """The server keeps a batch but the answer is lost: at-least-once gives counted duplicates."""
    emulator.faults.drop_after_accept_next = 3
    td = make_client(max_queue_size=N)
    await send_numbered(td)
    await td.flush()
    assert emulator.distinct_ids() == set(range(N))
    assert emulator.duplicates() == 300
    assert td.stats.sent == N
    assert_books_balance(td)


async def test_aclose_returns_within_its_timeout_when_the_server_never_answers(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A server that holds every request: aclose(timeout=1) returns and drops with 'shutdown'."""
    emulator.faults.update({"stall_next": 1000, "stall_seconds": 60.0})
    td = make_client(request_timeout=30.0)
    await send_numbered(td, 500)
    result = await asyncio.wait_for(td.aclose(timeout=1.0), timeout=30)
    assert result.dropped == {"shutdown": 500}
    assert result.pending == 0
    assert_books_balance(td)


async def test_aclose_interrupts_a_long_backoff(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A batch waiting out a 60 s backoff does not hold up aclose(timeout=1)."""
    emulator.faults.update({"status_always": 503, "retry_after": "60"})
    td = make_client(retry=RetryPolicy(initial_backoff=60, max_backoff=60, deadline=600))
    await send_numbered(td, 50)
    await td.flush(timeout=0.5)
    result = await asyncio.wait_for(td.aclose(timeout=1.0), timeout=30)
    assert result.dropped == {"shutdown": 50}
    assert_books_balance(td)


async def test_retry_deadline_drops_with_retries_exhausted(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Past the retry deadline, without a spool, the batch is dropped as retries_exhausted."""
    emulator.faults.status_always = 500
    # A deadline far above one attempt's time, so a slow machine still gets its retries in.
    td = make_client(retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.02, deadline=2.0))
    await send_numbered(td, 30)
    result = await td.flush()
    assert result.dropped == {"retries_exhausted": 30}
    assert td.stats.retried_requests >= 2
    assert_books_balance(td)


async def test_permanent_status_is_not_retried(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """501 means retrying will not help: one request, dropped as permanent_error."""
    emulator.faults.status_always = 501
    td = make_client()
    await send_numbered(td, 10)
    result = await td.flush()
    assert result.dropped == {"permanent_error": 10}
    assert len(emulator.requests) == 1
    assert_books_balance(td)


async def test_long_outage_keeps_memory_flat_and_counts_overflow(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """An outage with max_queue_size=100: memory stays flat, every overflow is counted."""
    emulator.faults.status_always = 503
    td = make_client(
        max_queue_size=100, retry=RetryPolicy(initial_backoff=5, max_backoff=5, deadline=600)
    )
    await send_numbered(td, 500, nowait=True)
    await asyncio.sleep(0.05)
    tracemalloc.start()
    try:
        await send_numbered(td, 1000, nowait=True)
        early, _ = tracemalloc.get_traced_memory()
        await send_numbered(td, 20_000, nowait=True)
        late, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stats = td.stats
    assert stats.queue_depth <= 100
    assert late - early < 64 * 1024, (early, late)
    assert stats.dropped["queue_full"] >= 21_500 - 100 - stats.in_flight
    await td.aclose(timeout=1.0)
    assert_books_balance(td)


async def test_await_signal_waits_for_room_instead_of_dropping_a_burst(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """With a healthy endpoint, a burst larger than the queue is not dropped by await signal()."""
    td = make_client(max_queue_size=200, flush_interval=0.05)
    await td.start()
    await send_numbered(td, 2000)
    result = await td.flush()
    assert result.dropped == {}
    assert emulator.distinct_ids() == set(range(2000))
    assert_books_balance(td)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, RejectedError),
        (401, AuthenticationError),
        (403, AuthenticationError),
        (404, AuthenticationError),
        (408, RetryableStatusError),
        (413, PayloadTooLargeError),
        (422, RejectedError),
        (429, RetryableStatusError),
        (500, RetryableStatusError),
        (501, PermanentStatusError),
        (502, RetryableStatusError),
        (503, RetryableStatusError),
        (504, RetryableStatusError),
        (505, PermanentStatusError),
        (507, RetryableStatusError),
        (418, PermanentStatusError),
        (301, RedirectError),
        (302, RedirectError),
        (303, RedirectError),
        (307, RedirectError),
        (308, RedirectError),
    ],
)
def test_status_classification(status: int, error: type[Exception]) -> None:
    """Each status maps to the documented error class (and so to its retry decision)."""
    exc = classify_status(status, "", None)
    assert type(exc) is error


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_any_2xx_is_success(status: int) -> None:
    """Every 2xx status counts as delivered."""
    assert classify_status(status, "", None) is None


def test_retry_after_seconds_and_http_date_are_parsed() -> None:
    """Retry-After works as delta-seconds and as an HTTP-date; junk is ignored."""
    now = time.time()
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 2.5 ") == 2.5
    date = email.utils.formatdate(now + 30, usegmt=True)
    parsed = parse_retry_after(date, now=now)
    assert parsed is not None
    assert 28 <= parsed <= 31
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-5") == 0.0


def test_retry_after_is_clamped_to_the_backoff_cap() -> None:
    """A server asking for an hour is waited at most max_backoff."""
    policy = RetryPolicy(max_backoff=30)
    assert policy.retry_after_wait(3600) == 30
    assert policy.retry_after_wait(2) == 2
    assert policy.retry_after_wait(None) == 0


def test_same_warning_is_rate_limited_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    """The same warning is logged once per interval; the next one says how many were held back."""
    caplog.set_level(logging.WARNING, logger="telemetrydeck_async")
    clock = [0.0]
    limiter = RateLimitedLog(interval=60.0, clock=lambda: clock[0])
    for _ in range(5):
        limiter.log(logging.WARNING, "k", "queue full")
    limiter.log(logging.WARNING, "other", "something else")
    clock[0] = 61.0
    limiter.log(logging.WARNING, "k", "queue full")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "queue full",
        "something else",
        "queue full (4 similar messages suppressed in the last 60 s)",
    ]


def test_fast_retry_policy_used_by_tests_is_valid() -> None:
    """The shared test policy is a real RetryPolicy (guards the fixtures)."""
    assert FAST_RETRY.deadline > FAST_RETRY.max_backoff


async def test_close_during_a_split_accounts_each_signal_once(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """aclose() while 413 halves are still being sent: sent + dropped covers each signal once."""
    emulator.faults.update({"max_body_bytes": 3000, "delay": 0.05})
    td = make_client()
    await send_numbered(td, 400)
    await asyncio.sleep(0.3)  # some halves are delivered, others still waiting
    result = await asyncio.wait_for(td.aclose(timeout=0.5), timeout=30)
    stats = td.stats
    assert stats.sent == len(emulator.distinct_ids())
    assert stats.sent + stats.dropped_total == 400
    assert set(stats.dropped) <= {"shutdown"}
    assert result.pending == 0
    assert_books_balance(td)


async def test_a_request_cut_short_by_aclose_is_spooled_and_sent_by_the_next_client(
    emulator: IngestEmulator, tmp_path: Path
) -> None:
    """A batch whose request still hangs when aclose() runs out of time goes to the spool."""
    emulator.faults.delay = 60
    td = spool_client(emulator.base_url, tmp_path, request_timeout=30, batch_size=20)
    await send_numbered(td, 50)
    await td.flush(timeout=0.3)  # two batches go out and hang; the rest stays queued
    assert td.stats.in_flight > 0
    result = await asyncio.wait_for(td.aclose(timeout=1.0), timeout=30)
    assert (result.spooled, dict(result.dropped), result.pending) == (50, {}, 0)
    assert balanced(td.stats)
    emulator.faults.delay = 0
    async with spool_client(emulator.base_url, tmp_path) as again:
        assert await emulator.wait_for_signals(50, timeout=30)
    assert emulator.distinct_ids() == set(range(50))
    assert again.stats.recovered == 50
