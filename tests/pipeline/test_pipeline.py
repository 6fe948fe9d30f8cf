"""The core pipeline end to end: what goes on the wire, batching, flushing, retries, closing."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import threading
import time

import pytest

from telemetrydeck_async import (
    ClientClosedError,
    InvalidSignalError,
    TelemetryClient,
    WrongEventLoopError,
)
from telemetrydeck_async._batcher import Batch, Batcher
from telemetrydeck_async._transport import USER_AGENT
from telemetrydeck_async.devserver import IngestEmulator
from tests.helpers import ClientFactory, sdk_parameters, sha256_hex

#: Part of the fast core CI also runs on the installed wheel (oldest and newest Python).
pytestmark = pytest.mark.core

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_exact_json_body_for_a_known_signal(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """The signal object carries exactly the documented fields, with the user hashed + salted."""
    td = make_client(app_id="APP-1", salt="pepper", session_id="session-1", test_mode=True)
    before = time.time()
    await td.signal(
        "Checkout.Payment.completed",
        client_user="user-42",
        payload={"Cart.items": 3, "Cart.coupon": True},
        float_value=19.99,
    )
    await td.flush()
    (signal,) = emulator.signals
    received_at = signal.pop("receivedAt")
    assert signal == {
        "appID": "APP-1",
        "clientUser": sha256_hex("user-42pepper"),
        "sessionID": "session-1",
        "type": "Checkout.Payment.completed",
        "isTestMode": True,
        "floatValue": 19.99,
        "payload": {"Cart.items": 3, "Cart.coupon": True, **sdk_parameters()},
    }
    assert ISO_Z.match(received_at)
    sent_at = dt.datetime.strptime(received_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=dt.timezone.utc
    )
    assert before - 1 <= sent_at.timestamp() <= time.time() + 1
    (request,) = emulator.requests
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    assert request.headers["User-Agent"] == USER_AGENT


async def test_raw_user_id_and_salt_never_reach_the_wire(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Neither the raw id nor the salt appears anywhere in what the server received."""
    td = make_client(salt="s3cret-salt")
    await td.signal("App.launched", client_user="alice@example.com")
    await td.flush()
    body = repr(emulator.batches)
    assert "alice@example.com" not in body
    assert "s3cret-salt" not in body


async def test_float_value_is_omitted_when_not_given(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """floatValue is top-level and only present when the caller gave one."""
    td = make_client()
    await td.signal("App.launched")
    await td.flush()
    assert "floatValue" not in emulator.signals[0]


async def test_namespaced_url_is_used_when_namespace_given(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """With a namespace the request goes to /v2/namespace/{namespace}/."""
    td = make_client(namespace="com.example.shop")
    await td.signal("App.launched")
    await td.flush()
    assert [r.path for r in emulator.requests] == ["/v2/namespace/com.example.shop/"]
    assert emulator.namespaces == ["com.example.shop"]


async def test_legacy_url_is_used_without_namespace(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Without a namespace the request goes to the older /v2/ endpoint."""
    td = make_client(namespace=None)
    await td.signal("App.launched")
    await td.flush()
    assert [r.path for r in emulator.requests] == ["/v2/"]


async def test_burst_is_batched_by_count(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """250 signals with batch_size 100 arrive as batches of 100, 100 and 50."""
    td = make_client(batch_size=100)
    for i in range(250):
        await td.signal("App.tick", payload={"Test.id": i})
    result = await td.flush()
    assert result.sent == 250
    assert sorted((len(b) for b in emulator.batches), reverse=True) == [100, 100, 50]
    assert emulator.distinct_ids() == set(range(250))


async def test_batches_never_exceed_max_batch_bytes(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """With a small byte budget, batches are cut by bytes and no body exceeds the limit."""
    td = make_client(max_batch_bytes=2048, batch_size=100)
    for i in range(60):
        await td.signal("App.tick", payload={"Test.id": i, "Test.pad": "p" * 200})
    await td.flush()
    assert len(emulator.batches) > 1
    assert all(r.body_bytes <= 2048 for r in emulator.requests)
    assert all(len(b) < 100 for b in emulator.batches)
    assert emulator.distinct_ids() == set(range(60))


async def test_signals_are_sent_after_flush_interval_without_flush(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A partial batch leaves once its oldest signal is flush_interval old."""
    td = make_client(flush_interval=0.2, batch_size=100)
    for i in range(3):
        await td.signal("App.tick", payload={"Test.id": i})
    assert await emulator.wait_for_signals(3, timeout=10)
    assert len(emulator.batches) == 1


async def test_full_batch_is_sent_without_waiting_for_the_interval(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Reaching batch_size wakes the flusher at once, long before a 60 s interval."""
    td = make_client(flush_interval=60.0, batch_size=10)
    for i in range(10):
        await td.signal("App.tick", payload={"Test.id": i})
    assert await emulator.wait_for_signals(10, timeout=10)


async def test_flush_returns_counts_and_empty_queue(make_client: ClientFactory) -> None:
    """flush() waits for everything queued before it and reports what it accounted for."""
    td = make_client()
    for _ in range(30):
        td.signal_nowait("App.tick")
    result = await td.flush()
    assert (result.sent, result.spooled, result.dropped_total, result.pending) == (30, 0, 0, 0)
    stats = td.stats
    assert (stats.enqueued, stats.sent, stats.queue_depth, stats.in_flight) == (30, 30, 0, 0)


async def test_aclose_flushes_pending_signals_and_is_idempotent(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """aclose() sends what is queued, then a second aclose() returns the same result."""
    td = make_client()
    for i in range(5):
        await td.signal("App.tick", payload={"Test.id": i})
    first = await td.aclose()
    second = await td.aclose()
    assert first.sent == 5
    assert second is first
    assert emulator.distinct_ids() == set(range(5))


async def test_signal_after_aclose_raises_client_closed(make_client: ClientFactory) -> None:
    """A closed client refuses new signals with a clear error."""
    td = make_client()
    await td.aclose()
    with pytest.raises(ClientClosedError):
        await td.signal("App.tick")
    with pytest.raises(ClientClosedError):
        td.signal_nowait("App.tick")


#: What each kind of call meets, per client state: the exception's class, or None (let in).
#: Calls: ``await signal()``, ``signal_nowait()`` on the loop and in a thread with no loop,
#: ``signal_threadsafe()`` from a thread. The order of the checks shows in the "bad" rows:
#: a call that cannot run where it is made is told so before its arguments are looked at.
GATE_TABLE: dict[tuple[bool, str, bool], tuple[str | None, str | None, str | None, str | None]] = {
    # (enabled, state, bad arguments): (await, nowait, nowait off any loop, threadsafe)
    (True, "new", False): (None, None, "WrongEventLoopError", "WrongEventLoopError"),
    (True, "new", True): (
        "InvalidSignalError",
        "InvalidSignalError",
        "WrongEventLoopError",
        "WrongEventLoopError",
    ),
    (True, "closed", False): (
        "ClientClosedError",
        "ClientClosedError",
        "WrongEventLoopError",
        "ClientClosedError",
    ),
    (False, "new", False): (None, None, None, None),
    (False, "new", True): ("InvalidSignalError",) * 4,
    (False, "closed", False): ("ClientClosedError",) * 4,
}


@pytest.mark.parametrize(("enabled", "state", "bad"), list(GATE_TABLE))
async def test_each_kind_of_call_is_let_in_or_refused_by_state(
    make_client: ClientFactory, enabled: bool, state: str, bad: bool
) -> None:
    """Closed, disabled, unbound: each kind of call gets the same answer it always got."""
    signal_type = "" if bad else "App.tick"

    async def attempt(kind: int) -> str | None:
        td = make_client(enabled=enabled)
        if state == "closed":
            await td.aclose()
        try:
            if kind == 0:
                await td.signal(signal_type)
            elif kind == 1:
                td.signal_nowait(signal_type)
            elif kind == 2:
                await asyncio.to_thread(td.signal_nowait, signal_type)
            else:
                await asyncio.to_thread(td.signal_threadsafe, signal_type)
        except (ClientClosedError, WrongEventLoopError, InvalidSignalError) as exc:
            return type(exc).__name__
        return None

    assert tuple([await attempt(kind) for kind in range(4)]) == GATE_TABLE[enabled, state, bad]


async def test_async_with_closes_the_client(emulator: IngestEmulator) -> None:
    """Leaving the async with block flushes and closes."""
    async with TelemetryClient(
        "app", base_url=emulator.base_url, default_user="u", flush_interval=60
    ) as td:
        await td.signal("App.tick")
    assert td.closed
    assert len(emulator.signals) == 1


async def test_transient_503_is_retried_to_success(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Two 503 answers are retried with backoff and the batch is then delivered."""
    emulator.faults.fail_next = 2
    td = make_client()
    for i in range(10):
        await td.signal("App.tick", payload={"Test.id": i})
    result = await td.flush()
    assert result.sent == 10
    assert td.stats.retried_requests == 2
    assert emulator.distinct_ids() == set(range(10))
    assert [r.status for r in emulator.requests] == [503, 503, 200]


async def test_received_at_is_unchanged_across_a_retry(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """When an answer is lost and the batch resent, both copies carry the same receivedAt."""
    emulator.faults.drop_after_accept_next = 1
    td = make_client()
    await td.signal("App.tick", payload={"Test.id": 1})
    await asyncio.sleep(0.01)  # a later signal must not share the millisecond by accident
    await td.signal("App.tick", payload={"Test.id": 2})
    await td.flush()
    assert emulator.duplicates() == 2
    by_id: dict[int, set[str]] = {}
    for signal in emulator.signals:
        by_id.setdefault(signal["payload"]["Test.id"], set()).add(signal["receivedAt"])
    assert all(len(times) == 1 for times in by_id.values())
    assert by_id[1] != by_id[2]


async def test_signal_from_another_event_loop_is_refused(make_client: ClientFactory) -> None:
    """A client bound to one loop raises WrongEventLoopError when used from another."""
    td = make_client()
    await td.start()
    errors: list[BaseException] = []

    def other_thread() -> None:
        async def use() -> None:
            await td.signal("App.tick")

        try:
            asyncio.run(use())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], WrongEventLoopError)


async def test_a_raising_on_error_callback_does_not_stop_delivery(
    make_client: ClientFactory, emulator: IngestEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception inside on_error is logged and never reaches the flusher."""

    def broken(exc: BaseException) -> None:
        raise RuntimeError("callback bug")

    emulator.faults.fail_next = 1
    td = make_client(on_error=broken)
    await td.signal("App.tick", payload={"Test.id": 1})
    result = await td.flush()
    assert result.sent == 1
    assert "on_error callback raised" in caplog.text


async def test_flusher_survives_an_unexpected_exception(
    make_client: ClientFactory,
    emulator: IngestEmulator,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug inside one flusher iteration is logged with a traceback and the task carries on."""
    td = make_client()
    await td.start()
    real_take = Batcher.take
    calls = {"n": 0}

    def take_failing_once(self: Batcher) -> Batch | None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom in take")
        return real_take(self)

    monkeypatch.setattr(Batcher, "take", take_failing_once)
    await td.signal("App.tick", payload={"Test.id": 7})
    result = await td.flush(timeout=10)
    assert result.sent == 1
    assert calls["n"] >= 2
    assert "unexpected error in the flusher" in caplog.text
    assert "boom in take" in caplog.text
    assert td.stats.last_error is not None
