"""The client with an on-disk spool: restarts, outages, crashes (real processes, real files)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from pathlib import Path

import pytest

from telemetrydeck_async import RetryPolicy, TelemetryClient
from telemetrydeck_async._spool import open_spool
from telemetrydeck_async._spool_link import AWAITED_OVERFLOW, OVERFLOW_BYTES
from telemetrydeck_async.devserver import IngestEmulator
from tests.helpers import SHORT_DEADLINE, free_port, spool_client, start_producer


async def send_numbered(td: TelemetryClient, ids: range) -> None:
    """Signals with ``Test.id`` from ``ids``."""
    for i in ids:
        await td.signal("Spool.case", payload={"Test.id": i})


async def drain_into(
    emulator: IngestEmulator, spool_dir: Path, expected: int, app_id: str = "spool-app"
) -> TelemetryClient:
    """Start a fresh client on the spool; wait (bounded) for ``expected`` ids or an empty spool."""
    td = spool_client(emulator.base_url, spool_dir, app_id)
    await td.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline:
        if len(emulator.distinct_ids()) >= expected or td.stats.spool_records == 0:
            break
        await emulator.wait_for_signals(len(emulator.signals) + 1, timeout=0.2)
    return td


async def test_graceful_restart_delivers_everything_with_original_received_at(
    tmp_path: Path,
) -> None:
    """aclose() with the endpoint down spools all; the next client sends them, times intact."""
    port = free_port()
    first = spool_client(f"http://127.0.0.1:{port}", tmp_path, retry=SHORT_DEADLINE)
    await send_numbered(first, range(1000))
    closed = await first.aclose(timeout=3)
    assert closed.dropped == {}
    assert first.stats.spooled == 1000
    assert first.stats.enqueued == first.stats.spooled
    restart_started = "9999"
    await asyncio.sleep(1.1)  # the resent signals must not share the first run's second
    async with IngestEmulator(port=port) as emulator:
        second = await drain_into(emulator, tmp_path, 1000)
        restart_started = _iso_now()
        await second.aclose()
    assert emulator.distinct_ids() == set(range(1000))
    assert emulator.duplicates() == 0
    assert all(s["receivedAt"] < restart_started for s in emulator.signals)
    assert second.stats.recovered == 1000
    assert second.stats.sent == 0


def _iso_now() -> str:
    """The current UTC time in the SDK's receivedAt format (sortable as text)."""
    import time

    from telemetrydeck_async._signal import format_received_at

    return format_received_at(time.time())


async def test_retries_exhausted_go_to_the_spool_not_the_floor(
    tmp_path: Path, emulator: IngestEmulator
) -> None:
    """Past the retry deadline with a spool configured, the batch is spooled, not dropped."""
    emulator.faults.status_always = 500
    td = spool_client(emulator.base_url, tmp_path, retry=SHORT_DEADLINE)
    await send_numbered(td, range(50))
    result = await td.flush()
    assert result.spooled == 50
    assert result.dropped == {}
    emulator.faults.status_always = None
    await emulator.wait_for_signals(50, timeout=30)
    await td.aclose()
    assert emulator.distinct_ids() == set(range(50))
    assert td.stats.recovered == 50


async def test_recovery_interrupted_by_an_outage_gives_claimed_batches_back(
    tmp_path: Path, emulator: IngestEmulator
) -> None:
    """Recovery claims ahead; when the endpoint fails mid-way, the claimed rest is resent."""
    emulator.faults.status_always = 500
    first = spool_client(emulator.base_url, tmp_path, retry=SHORT_DEADLINE, batch_size=1000)
    await send_numbered(first, range(2000))
    assert (await first.flush()).spooled == 2000
    await first.aclose()
    # The endpoint comes back slowly, then fails again while recovery has batches claimed
    # ahead of the requests; those must go back to the spool, not sit with this process.
    emulator.faults.update({"status_always": None, "delay": 0.02})
    td = spool_client(emulator.base_url, tmp_path, retry=SHORT_DEADLINE, batch_size=20)
    await td.start()
    assert await emulator.wait_for_signals(100, timeout=60)
    emulator.faults.status_always = 503
    await asyncio.sleep(0.3)
    emulator.faults.update({"status_always": None, "delay": 0.0})
    assert await emulator.wait_for_signals(2000, timeout=60)
    await td.aclose()
    assert emulator.distinct_ids() == set(range(2000))
    assert td.stats.recovered == 2000
    assert td.stats.spool_records == 0


async def test_queue_overflow_spills_to_disk_instead_of_dropping(
    tmp_path: Path, emulator: IngestEmulator
) -> None:
    """signal_nowait() past max_queue_size during an outage: the overflow is spooled."""
    emulator.faults.status_always = 503
    td = spool_client(
        emulator.base_url,
        tmp_path,
        max_queue_size=20,
        retry=RetryPolicy(initial_backoff=5, max_backoff=5, deadline=60),
    )
    await td.start()
    for i in range(500):
        td.signal_nowait("Spool.case", payload={"Test.id": i})
    closed = await td.aclose(timeout=3)
    stats = td.stats
    assert stats.dropped == {}
    assert stats.spooled == 500
    assert closed.pending == 0
    emulator.faults.status_always = None
    again = await drain_into(emulator, tmp_path, 500)
    await again.aclose()
    assert emulator.distinct_ids() == set(range(500))


async def _outage_client(
    emulator: IngestEmulator, tmp_path: Path, max_queue_size: int
) -> TelemetryClient:
    """A started client whose spool is open and whose endpoint answers 503 for a long time."""
    emulator.faults.status_always = 503
    td = spool_client(
        emulator.base_url,
        tmp_path,
        max_queue_size=max_queue_size,
        retry=RetryPolicy(initial_backoff=5, max_backoff=5, deadline=60),
    )
    await td.start()
    await td._flusher.link.ready(30)
    return td


async def _settled(td: TelemetryClient, overflowed: int) -> None:
    """Wait (bounded) until ``overflowed`` signals are spooled or dropped."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while td.stats.spooled + td.stats.dropped_total < overflowed and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def test_nowait_burst_that_never_yields_waits_for_the_disk_not_the_floor(
    tmp_path: Path, emulator: IngestEmulator
) -> None:
    """A loop of 20,000 signal_nowait() without a yield, endpoint down: none dropped."""
    td = await _outage_client(emulator, tmp_path, max_queue_size=100)
    for i in range(20_000):  # more than the old count bound of the overflow buffer
        td.signal_nowait("Spool.case", payload={"Test.id": i})
    await _settled(td, 20_000 - 100)
    closed = await td.aclose(timeout=2)
    assert td.stats.dropped == {}
    assert td.stats.spooled == 20_000
    assert closed.pending == 0


async def test_overflow_memory_is_bounded_by_bytes(
    tmp_path: Path, emulator: IngestEmulator
) -> None:
    """Large signals overflowing with no yield: the oldest beyond the byte budget are dropped."""
    td = await _outage_client(emulator, tmp_path, max_queue_size=10)
    blob = "x" * 30_000
    n = OVERFLOW_BYTES // 30_000 + 200
    for i in range(n):
        td.signal_nowait("Spool.case", payload={"Test.id": i, "Test.blob": blob})
        assert td._flusher.link.overflow_depth <= OVERFLOW_BYTES // 30_000
    await _settled(td, n - 10)
    closed = await td.aclose(timeout=2)
    stats = td.stats
    # How many are dropped depends on how much the spool's thread wrote during the burst (it
    # does not wait for the loop); the bound above held at every call either way.
    assert set(stats.dropped) <= {"queue_full"}
    assert stats.spooled + stats.dropped_total == n
    assert closed.pending == 0


async def test_refused_app_id_keeps_signals_in_the_spool(
    tmp_path: Path, emulator: IngestEmulator
) -> None:
    """401 with a spool: the refused batch is spooled and delivered once the ID is fixed."""
    emulator.faults.status_always = 401
    td = spool_client(emulator.base_url, tmp_path)
    await send_numbered(td, range(30))
    result = await td.flush()
    assert result.spooled == 30
    assert result.dropped == {}
    await td.aclose()
    emulator.faults.status_always = None
    again = await drain_into(emulator, tmp_path, 30)
    await again.aclose()
    assert emulator.distinct_ids() == set(range(30))


async def test_always_durability_writes_before_signal_returns(
    tmp_path: Path, emulator: IngestEmulator
) -> None:
    """With durability='always' a signal is on disk when await signal() returns."""
    emulator.faults.status_always = 503
    td = spool_client(
        emulator.base_url,
        tmp_path,
        durability="always",
        retry=RetryPolicy(initial_backoff=5, max_backoff=5, deadline=60),
    )
    await send_numbered(td, range(25))
    observer = await open_spool(tmp_path)
    try:
        status = await observer.status()
    finally:
        await observer.close()
    assert status.records == 25
    emulator.faults.status_always = None
    await td.flush()
    await td.aclose()
    assert emulator.distinct_ids() == set(range(25))
    observer = await open_spool(tmp_path)
    try:
        assert (await observer.status()).records == 0
    finally:
        await observer.close()


async def test_stats_report_spool_figures(tmp_path: Path) -> None:
    """stats show the spool's records and bytes (None without a spool)."""
    port = free_port()
    td = spool_client(f"http://127.0.0.1:{port}", tmp_path, retry=SHORT_DEADLINE)
    await send_numbered(td, range(10))
    await td.aclose(timeout=3)
    stats = td.stats
    assert stats.spool_records == 10
    assert stats.spool_bytes is not None
    assert stats.spool_bytes > 10 * 100
    plain = TelemetryClient("app", default_user="u")
    assert plain.stats.spool_records is None


def _acknowledged(lines: list[str]) -> set[int]:
    """The ids the producer reported as returned from ``await td.signal()``."""
    return {int(i) for line in lines if line.startswith("ok ") for i in line.split()[1:]}


async def _spooled_ids(spool_dir: Path) -> set[int]:
    """The ``Test.id`` of every signal on disk, read without sending (the claims are undone)."""
    spool = await open_spool(spool_dir)
    try:
        claim = await spool.claim(1_000_000)
        await spool.release([record_id for record_id, _ in claim.records])
    finally:
        await spool.close()
    return {json.loads(body)["payload"]["Test.id"] for body in claim.bodies()}


async def _crash_trial(
    tmp_path: Path, durability: str, *, queue: int, pace: float = 0.0
) -> tuple[set[int], set[int], set[int]]:
    """Run a producer, SIGKILL it mid-stream, recover.

    Returns the ids acknowledged (``signal()`` returned) before the kill, those on disk right
    after it, and those delivered by the next process.
    """
    port = free_port()
    spool_dir = tmp_path / "spool"
    child = await start_producer(port, spool_dir, durability, 20_000, 32, queue, pace)
    try:
        await child.wait_for("^ready$", timeout=60)
        target = random.randint(2000, 12000)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while loop.time() < deadline and child.proc.returncode is None:
            if len(_acknowledged(child.out)) >= target:
                break
            await asyncio.sleep(0.01)
        if child.proc.returncode is None:
            child.send_signal(signal.SIGKILL)
        await child.finish(timeout=30)
        acknowledged = _acknowledged(child.out)
    finally:
        await child.kill()
    assert acknowledged, child.output
    on_disk = await _spooled_ids(spool_dir)
    async with IngestEmulator(port=port) as emulator:
        # The producer's app: a client of another app would leave its signals alone.
        td = await drain_into(emulator, spool_dir, len(acknowledged), app_id="crash-app")
        await asyncio.sleep(0.3)  # anything beyond the acknowledged ids also arrives
        await td.aclose()
    assert emulator.duplicates() == 0
    return acknowledged, on_disk, emulator.distinct_ids()


@pytest.mark.parametrize("trial", range(3))
async def test_kill_9_loses_nothing_with_always_durability(tmp_path: Path, trial: int) -> None:
    """SIGKILL at a random point: every signal whose signal() returned is delivered later."""
    acknowledged, on_disk, delivered = await _crash_trial(tmp_path, "always", queue=10_000)
    assert acknowledged <= on_disk
    assert acknowledged <= delivered


@pytest.mark.parametrize("trial", range(2))
async def test_kill_9_with_spill_delivers_everything_that_was_spilled(
    tmp_path: Path, trial: int
) -> None:
    """SIGKILL with durability='spill': all that reached the disk arrives; only memory is lost."""
    queue = 500
    acknowledged, on_disk, delivered = await _crash_trial(
        tmp_path, "spill", queue=queue, pace=0.002
    )
    assert on_disk
    assert on_disk <= delivered
    # What can be lost is what sat in memory: the queue, the batches in flight and the overflow
    # in front of the disk (awaiting callers wait once it holds AWAITED_OVERFLOW; each of the
    # 32 callers may add one as the writer finishes).
    lost = acknowledged - delivered
    assert len(lost) <= queue + 2 * 100 + AWAITED_OVERFLOW + 32


async def test_unusable_spool_dir_degrades_to_memory_only(
    tmp_path: Path, emulator: IngestEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A spool_dir that cannot be created: logged, and the client works from memory."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    td = spool_client(emulator.base_url, blocker / "spool")
    await send_numbered(td, range(20))
    result = await td.flush()
    assert result.sent == 20
    emulator.faults.status_always = 503
    await send_numbered(td, range(20, 30))
    closed = await td.aclose(timeout=1)
    assert closed.dropped == {"shutdown": 10}
    assert td.stats.spooled == 0
    assert "spool" in caplog.text
    assert emulator.distinct_ids() == set(range(20))


async def test_flush_returns_once_delivered_records_are_off_the_disk(
    tmp_path: Path, emulator: IngestEmulator
) -> None:
    """durability="always": after flush() the delivered records are acked, none left to resend.

    A Lambda-style process may be frozen or killed right after flush(); a record still on disk
    then would be sent again by the next start.
    """
    td = spool_client(emulator.base_url, tmp_path, durability="always", flush_interval=60.0)
    await td.start()
    try:
        await send_numbered(td, range(40))
        result = await td.flush(timeout=30)
        assert result.pending == 0
        assert td.stats.sent == 40
        reader = await open_spool(tmp_path)
        try:
            status = await reader.status()
        finally:
            await reader.close()
        assert status.error is None
        assert status.records == 0, "delivered records were still on disk when flush() returned"
    finally:
        await td.aclose(timeout=10)
    assert emulator.distinct_ids() == set(range(40))
