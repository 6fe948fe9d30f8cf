"""SyncTelemetryClient in this process: threads, validation, presets, flush bounds, close.

The emulator runs on its own loop in a thread (``threaded_emulator``), so these tests can block
on the client the way a Django view or a script does.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from telemetrydeck_async import (
    ClientClosedError,
    ConfigurationError,
    InvalidSignalError,
    RetryPolicy,
    SyncTelemetryClient,
    TelemetryClient,
)
from tests.helpers import FAST_RETRY, ThreadedEmulator, balanced

BOUND = 60.0


@pytest.fixture
def make_sync(threaded_emulator: ThreadedEmulator) -> Iterator[Any]:
    """Build SyncTelemetryClients aimed at the threaded emulator; each is closed afterwards."""
    clients: list[SyncTelemetryClient] = []

    def factory(**options: Any) -> SyncTelemetryClient:
        options.setdefault("namespace", "com.example")
        options.setdefault("base_url", threaded_emulator.emu.base_url)
        options.setdefault("default_user", "test-user")
        options.setdefault("retry", FAST_RETRY)
        options.setdefault("flush_interval", 60.0)
        client = SyncTelemetryClient("test-app", **options)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close(timeout=5)


def test_eight_threads_hammering_one_client_deliver_every_signal_once(
    make_sync: Any, threaded_emulator: ThreadedEmulator
) -> None:
    """8 threads x 400 signals from one client: all arrive once, and the books balance."""
    td = make_sync(batch_size=50)
    threads, per_thread = 8, 400
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def submit(base: int) -> None:
        try:
            barrier.wait(BOUND)
            for i in range(per_thread):
                td.signal("Worker.Job.done", payload={"Test.id": base + i})
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=submit, args=(n * per_thread,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(BOUND)
    assert errors == []
    td.close()
    assert threaded_emulator.emu.distinct_ids() == set(range(threads * per_thread))
    assert threaded_emulator.emu.duplicates() == 0
    stats = td.stats
    assert stats.sent == threads * per_thread
    assert balanced(stats)


def test_a_bad_call_raises_in_the_callers_thread_and_queues_nothing(make_sync: Any) -> None:
    """Validation happens in the calling thread: InvalidSignalError there, nothing enqueued."""
    td = make_sync()
    with pytest.raises(InvalidSignalError, match="payload"):
        td.signal("Bad.Payload.sent", payload={"nested": {"no": 1}})
    with pytest.raises(InvalidSignalError, match="amount_usd"):
        td.purchase_completed(-1.0, purchase_type="subscription")
    assert td.stats.enqueued == 0


def test_presets_send_the_same_wire_output_as_the_async_client(
    make_sync: Any, threaded_emulator: ThreadedEmulator
) -> None:
    """Every preset, the duration timer and new_session send what the async client sends."""

    def calls(td: Any, run: Any) -> None:
        run(td.error(ValueError("boom"), payload={"Test.id": "error"}))
        run(td.navigation("/a", "/b", payload={"Test.id": "navigation"}))
        run(
            td.purchase_completed(
                9.5, purchase_type="one-time-purchase", payload={"Test.id": "purchase"}
            )
        )
        run(td.free_trial_started(payload={"Test.id": "trial"}))
        run(td.converted_from_trial(amount_usd=3, payload={"Test.id": "converted"}))
        run(td.new_install_detected(payload={"Test.id": "install"}))
        run(td.user_acquired("ads", payload={"Test.id": "acquired"}))
        run(td.lead_started("l1", payload={"Test.id": "lead"}))
        run(td.lead_converted("l1", payload={"Test.id": "converted-lead"}))
        run(td.onboarding_completed(payload={"Test.id": "onboarding"}))
        run(td.core_feature_used("export", payload={"Test.id": "feature"}))

    sync = make_sync()
    calls(sync, lambda value: value)
    with pytest.raises(KeyError), sync.duration("Report.Export.built", payload={"Test.id": "d"}):
        raise KeyError("x")
    sync.new_session("session-2", client_user="u2")
    sync.flush()

    async def with_async() -> None:
        async with TelemetryClient(
            "test-app",
            namespace="com.example",
            base_url=threaded_emulator.emu.base_url,
            default_user="test-user",
            retry=FAST_RETRY,
        ) as td:
            for call in _coroutines(td):
                await call
            with (
                pytest.raises(KeyError),
                td.duration("Report.Export.built", payload={"Test.id": "d"}),
            ):
                raise KeyError("x")
            await td.new_session("session-2", client_user="u2")

    def _coroutines(td: TelemetryClient) -> list[Any]:
        made: list[Any] = []
        calls(td, made.append)
        return made

    sync_signals = list(threaded_emulator.emu.signals)
    threaded_emulator.emu.signals.clear()
    asyncio.run(with_async())
    async_signals = threaded_emulator.emu.signals

    def comparable(signals: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted(
            (
                s["type"],
                s["clientUser"],
                s.get("floatValue"),
                sorted(
                    (k, v)
                    for k, v in s["payload"].items()
                    if k != "TelemetryDeck.Signal.durationInSeconds"
                ),
                s["sessionID"] == "session-2",
            )
            for s in signals
        )

    assert len(sync_signals) == 13
    assert comparable(sync_signals) == comparable(async_signals)


def test_flush_is_bounded_by_default_while_the_endpoint_fails(
    make_sync: Any, threaded_emulator: ThreadedEmulator
) -> None:
    """Endpoint down, retries for minutes: flush() returns (close_timeout) with them pending."""
    threaded_emulator.emu.faults.status_always = 503
    td = make_sync(close_timeout=0.5, retry=RetryPolicy(initial_backoff=0.05, deadline=120))
    for i in range(5):
        td.signal("Job.Run.tick", payload={"Test.id": i})
    result = td.flush()
    assert result.pending == 5
    assert result.sent == 0
    assert balanced(td.stats)
    closed = td.close()
    assert closed.dropped == {"shutdown": 5}
    assert balanced(td.stats)


async def test_async_flush_is_bounded_by_close_timeout_by_default(
    make_client: Any, emulator: Any
) -> None:
    """TelemetryClient.flush() without a timeout stops at close_timeout, not the retry deadline."""
    emulator.faults.status_always = 503
    td = make_client(close_timeout=0.5, retry=RetryPolicy(initial_backoff=0.05, deadline=120))
    await td.signal("Job.Run.tick")
    result = await td.flush()
    assert result.pending == 1
    emulator.faults.status_always = None
    result = await td.flush(timeout=math.inf)
    assert result.sent == 1
    assert result.pending == 0


async def test_async_flush_after_flushes_after_every_invocation(
    make_client: Any, emulator: Any
) -> None:
    """TelemetryClient.flush_after: each invocation's signal is sent when the handler returns."""
    td = make_client()

    @td.flush_after
    async def handler(n: int) -> int:
        await td.signal("Job.Lambda.invoked", payload={"Test.id": n})
        return n * 2

    for n in range(5):
        assert await handler(n) == n * 2
        assert len(emulator.signals) == n + 1
    with pytest.raises(ConfigurationError, match="handler"):
        td.flush_after(lambda: None)


async def test_sync_flush_after_accepts_async_handlers_without_blocking_their_loop(
    make_sync: Any, threaded_emulator: ThreadedEmulator
) -> None:
    """SyncTelemetryClient.flush_after on an async handler flushes in a worker thread."""
    td = make_sync()

    @td.flush_after
    async def handler(n: int) -> int:
        td.signal("Job.Lambda.invoked", payload={"Test.id": n})
        return n

    for n in range(3):
        assert await handler(n) == n
        assert len(threaded_emulator.emu.signals) == n + 1


def test_close_is_idempotent_and_later_calls_raise(make_sync: Any) -> None:
    """close() twice gives one result; signal(), presets and timers raise ClientClosedError."""
    with make_sync() as td:
        td.signal("Job.Run.started")
    assert td.closed
    assert td.close() is td.close()
    with pytest.raises(ClientClosedError):
        td.signal("Job.Run.finished")
    with pytest.raises(ClientClosedError):
        td.error("E1")
    with pytest.raises(ClientClosedError), td.duration("Job.Run.timed"):
        pass
    assert td.flush().sent == 0
    assert td.stats.sent == 1
    assert "closed" in repr(td)


def test_a_never_used_client_closes_without_starting_a_thread(make_sync: Any) -> None:
    """close() before any signal: no loop thread, an empty result."""
    before = {t.name for t in threading.enumerate()}
    td = make_sync()
    assert "idle" in repr(td)
    assert td.close().sent == 0
    assert "telemetrydeck-sync" not in {t.name for t in threading.enumerate()} - before


def test_a_disabled_client_validates_and_starts_nothing(make_sync: Any) -> None:
    """enabled=False: calls are checked, nothing is queued, no thread starts."""
    td = make_sync(enabled=False)
    td.signal("Job.Run.started")
    td.error(RuntimeError("x"))
    with td.duration("Job.Run.timed"):
        pass
    with pytest.raises(InvalidSignalError):
        td.signal("")
    assert not td.enabled
    assert td.flush().sent == 0
    assert td.stats.enqueued == 0
    assert td._thread is None


def test_from_env_reads_the_same_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_env(): TELEMETRYDECK_* variables, keyword overrides, the same missing-id error."""
    monkeypatch.setenv("TELEMETRYDECK_APP_ID", "env-app")
    monkeypatch.setenv("TELEMETRYDECK_NAMESPACE", "com.example.env")
    td = SyncTelemetryClient.from_env(test_mode=True)
    assert isinstance(td, SyncTelemetryClient)
    assert (td.config.app_id, td.config.namespace, td.config.test_mode) == (
        "env-app",
        "com.example.env",
        True,
    )
    assert td.session_id
    monkeypatch.delenv("TELEMETRYDECK_APP_ID")
    with pytest.raises(ConfigurationError, match="TELEMETRYDECK_APP_ID"):
        SyncTelemetryClient.from_env()


def test_a_callback_on_the_loop_thread_cannot_wait_for_its_own_loop(
    make_sync: Any, threaded_emulator: ThreadedEmulator
) -> None:
    """flush() from on_error (the loop thread) raises instead of deadlocking; signal() works."""
    seen: list[BaseException] = []
    holder: list[SyncTelemetryClient] = []

    def on_error(exc: BaseException) -> None:
        td = holder[0]
        td.signal("Job.Error.seen", payload={"Test.id": "from-callback"})
        try:
            td.flush()
        except Exception as problem:
            seen.append(problem)

    threaded_emulator.emu.faults.fail_next = 1
    td = make_sync(on_error=on_error)
    holder.append(td)
    td.signal("Job.Run.tick", payload={"Test.id": "first"})
    td.flush()
    td.flush()
    assert [type(e).__name__ for e in seen] == ["WrongEventLoopError"]
    assert threaded_emulator.emu.distinct_ids() == {"first", "from-callback"}


def _close_while_calling(td: SyncTelemetryClient, threads: int, warm_up: int) -> int:
    """Close ``td`` while ``threads`` threads call signal() in a tight loop; calls that returned."""
    accepted = [0] * threads
    started = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def submit(n: int) -> None:
        try:
            started.wait(BOUND)
            while True:
                try:
                    td.signal("Worker.Job.done", payload={"Test.id": n})
                except ClientClosedError:
                    return  # refused: closed, and this call was not counted
                accepted[n] += 1
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=submit, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    started.wait(BOUND)
    # Let the callers get going (bounded: a slow machine only waits longer).
    deadline = time.monotonic() + BOUND
    while sum(accepted) < warm_up and time.monotonic() < deadline:
        time.sleep(0.001)
    td.close()
    for worker in workers:
        worker.join(BOUND)
    assert errors == []
    return sum(accepted)


def test_signals_racing_close_are_each_refused_or_counted(make_sync: Any) -> None:
    """Threads call signal() in a tight loop while close() runs: none is lost uncounted.

    Every call either raises ClientClosedError (refused, not counted) or returns, and then the
    books hold it: enqueued equals the calls that returned, nothing is left pending.
    """
    for round_ in range(2):
        td = make_sync(batch_size=50, close_timeout=5)
        accepted = _close_while_calling(td, threads=4, warm_up=200 * (round_ + 1))
        stats = td.stats
        assert stats.enqueued == accepted, (round_, stats, accepted)
        assert stats.pending == 0
        assert balanced(stats)


@pytest.mark.parametrize("durability", ["spill", "always"])
def test_a_call_inside_signal_while_close_runs_is_refused(
    make_sync: Any, tmp_path: Path, durability: str
) -> None:
    """A caller held inside signal() (its before_send) through a whole close() is refused."""
    inside, release = threading.Event(), threading.Event()

    def hold(signal: dict[str, Any]) -> dict[str, Any]:
        if signal["type"] == "Worker.Job.late":
            inside.set()
            release.wait(BOUND)
        return signal

    td = make_sync(before_send=hold, spool_dir=str(tmp_path), durability=durability)
    td.signal("Worker.Job.early")
    outcome: list[BaseException | None] = []

    def late() -> None:
        try:
            td.signal("Worker.Job.late")
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    caller = threading.Thread(target=late)
    caller.start()
    assert inside.wait(BOUND)
    result = td.close()  # the caller passed the closed check, and has not handed over yet
    release.set()
    caller.join(BOUND)
    assert [type(exc).__name__ for exc in outcome] == ["ClientClosedError"]
    assert result.sent == 1
    assert td.stats.enqueued == 1
    assert balanced(td.stats)
