"""A full disk under the spool: a real 2 MiB tmpfs, the endpoint down, then up again.

The spool must keep working when the filesystem is full: evict its oldest records (the
documented rule) instead of wedging on a WAL that can never be checkpointed, report the truth
in ``stats`` and ``spool status``, and deliver everything it still holds -- from the same
client and from a restarted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from telemetrydeck_async import TelemetryClient
from telemetrydeck_async._spool import SpoolRecord, open_spool, split_chunk
from telemetrydeck_async.devserver import IngestEmulator
from tests.helpers import (
    SHORT_DEADLINE,
    balanced,
    free_port,
    run_cli,
    spool_client,
    start_producer,
    wait_until,
)

DISK = "2m"


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A fresh 2 MiB tmpfs, mounted for the test and unmounted after it."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8); the full-disk tests cannot run")
    directory = Path(tempfile.mkdtemp(prefix="td-full-disk-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        directory.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield directory / "spool"
    finally:
        # Lazy: a failed test may leave a spool thread holding files open.
        subprocess.run(["umount", "-l", str(directory)], check=False)
        with contextlib.suppress(OSError):
            directory.rmdir()


def on_disk(spool_dir: Path) -> list[int]:
    """The ``Test.id`` of every record in the spool, oldest first, read by SQLite read-only."""
    uri = f"file:{spool_dir / 'spool.sqlite3'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        rows = conn.execute("SELECT body, sizes FROM records ORDER BY received_at, id").fetchall()
    return [json.loads(part)["payload"]["Test.id"] for row in rows for part in split_chunk(*row)]


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def status_records(spool_dir: Path) -> int:
    """What ``spool status`` says the spool holds (it must be able to read a full disk)."""
    code, out, err = await run_cli("spool", "status", str(spool_dir))
    assert code == 0, err
    match = re.search(r"records \(signals\)\s+(\d+)$", out, re.MULTILINE)
    assert match, out
    return int(match[1])


async def test_full_disk_evicts_oldest_and_the_same_client_delivers_the_rest(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """50,000 signals, endpoint down, 2 MiB disk: the newest stay, the truth is told, all sent."""
    caplog.set_level(logging.INFO, "telemetrydeck_async")
    port = free_port()
    # The queue of 10,000 overflows to the spool at once (the default holds a 50,000 burst).
    td = spool_client(
        f"http://127.0.0.1:{port}",
        small_disk,
        "disk-app",
        retry=SHORT_DEADLINE,
        max_queue_size=10_000,
    )
    await td.start()
    try:
        await fill_then_deliver(td, small_disk, port, caplog)
    finally:
        await td.aclose(timeout=10)
    assert balanced(td.stats)


async def fill_then_deliver(
    td: TelemetryClient, small_disk: Path, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(50_000):
        await td.signal("Disk.case", payload={"Test.id": i})
        if i % 5_000 == 0:
            assert balanced(td.stats)
    await td.flush(timeout=30)  # everything that could not be sent has gone to the spool
    assert balanced(td.stats)
    stats = td.stats
    assert stats.sent == 0
    assert stats.pending == 0
    assert stats.spool_dropped["spool_full"] > 0, "the disk filled up and evicted"
    assert free_bytes(small_disk) < 1024 * 1024
    held = on_disk(small_disk)
    assert 49_999 in held, "the newest signal is kept (the order itself: the test below)"
    assert stats.spooled == len(held) + stats.spool_dropped["spool_full"]
    # stats and `spool status` tell the truth while the disk is full.
    await wait_until(lambda: td.stats.spool_records == len(held))
    assert td.stats.spool_records == len(held)
    assert await status_records(small_disk) == len(held)
    assert not any("stays in memory only" in r.getMessage() for r in caplog.records)

    async with IngestEmulator(port=port) as emulator:
        await wait_until(lambda: set(held) <= emulator.distinct_ids())
        await wait_until(lambda: td.stats.spool_records == 0)
    assert set(held) == emulator.distinct_ids()
    assert emulator.duplicates() == 0
    assert td.stats.recovered == len(held)


async def test_full_disk_evicts_by_received_at_and_never_wedges(small_disk: Path) -> None:
    """Appends far beyond the disk: each one is stored, the oldest go, the WAL never wedges."""
    spool = await open_spool(small_disk)
    try:
        evicted = 0
        for n in range(100):
            batch = [
                SpoolRecord(
                    1_800_000_000.0 + n * 100 + i,
                    b'{"n":%07d,"pad":"%s"}' % (n * 100 + i, b"p" * 200),
                )
                for i in range(100)
            ]
            result = await spool.append(batch)
            assert (len(result.ids), result.failed, result.rejected) == (100, 0, 0)
            evicted += result.evicted
        status = await spool.status()
        assert status.error is None
        assert evicted > 0
        assert status.records + evicted == 100 * 100
        kept: list[int] = []
        for _ in range(status.records):  # a full disk may hand out less than asked at once
            claim = await spool.claim(100_000)
            if not claim.records:
                break
            kept.extend(int(body[5:12]) for _, body in claim.records)
            await spool.ack(record_id for record_id, _ in claim.records)
        assert kept == list(range(100 * 100 - status.records, 100 * 100))
        assert (await spool.status()).records == 0
    finally:
        await spool.close()


async def test_full_disk_left_by_a_process_is_delivered_by_the_next(small_disk: Path) -> None:
    """A process fills the disk and exits; the next one opens the spool and sends all of it."""
    port = free_port()
    producer = await start_producer(port, small_disk, "spill", 20_000, 16, 2_000)
    try:
        await producer.wait_for("^done$", timeout=180)
        assert await producer.finish(timeout=60) == 0, producer.output
    finally:
        await producer.kill()
    held = on_disk(small_disk)
    assert held, producer.output
    assert free_bytes(small_disk) < 1024 * 1024
    assert await status_records(small_disk) == len(held)
    async with IngestEmulator(port=port) as emulator:
        td = spool_client(emulator.base_url, small_disk, "crash-app")
        await td.start()
        await wait_until(lambda: set(held) <= emulator.distinct_ids())
        await td.aclose(timeout=10)
    assert set(held) == emulator.distinct_ids()
    assert emulator.duplicates() == 0
    assert on_disk(small_disk) == []


def fill_up(directory: Path) -> Path:
    """Take every free byte of the filesystem with one file; return it."""
    junk = directory / "junk"
    with junk.open("wb") as f, contextlib.suppress(OSError):  # ENOSPC: full
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return junk


async def test_disk_filled_to_the_last_byte_by_something_else(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No byte left for SQLite's shared-memory file: memory-only, said once, nothing lost."""
    port = free_port()
    first = spool_client(f"http://127.0.0.1:{port}", small_disk, "disk-app", retry=SHORT_DEADLINE)
    for i in range(300):
        await first.signal("Disk.case", payload={"Test.id": i})
    await first.aclose(timeout=10)
    assert first.stats.spooled == 300
    junk = fill_up(small_disk.parent)
    caplog.clear()
    td = spool_client(f"http://127.0.0.1:{port}", small_disk, "disk-app")
    await td.start()
    try:
        await wait_until(lambda: bool(errors(caplog)), timeout=30)
        (error,) = errors(caplog)
        assert str(small_disk) in error.getMessage()
        assert td.stats.spool_records is None, "unknown, not an empty spool"
        code, out, err = await run_cli("spool", "status", str(small_disk))
        assert code == 1
        assert "cannot be read" in err
        assert "records" not in out
        await td.signal("Disk.case", payload={"Test.id": 300})
        async with IngestEmulator(port=port) as emulator:
            await td.flush(timeout=30)
            assert emulator.distinct_ids() == {300}
            await td.aclose(timeout=10)
            junk.unlink()
            restarted = spool_client(emulator.base_url, small_disk, "disk-app")
            await restarted.start()
            await wait_until(lambda: set(range(301)) <= emulator.distinct_ids())
            await restarted.aclose(timeout=10)
    finally:
        await td.aclose(timeout=10)
    assert emulator.distinct_ids() == set(range(301))
    assert balanced(td.stats)


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """ERRORs, and the one WARNING that says the spool cannot be used (memory only)."""
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR
        or (r.levelno == logging.WARNING and "cannot be used" in r.getMessage())
    ]


async def test_an_ack_that_fails_on_a_full_disk_is_made_again(small_disk: Path) -> None:
    """Delivered records whose ack failed are deleted later: never sent twice by a next process."""
    spool = await open_spool(small_disk)

    async def ack_on_a_full_disk(held: int) -> None:
        claimed = await spool.claim(100)
        assert len(claimed.records) == 100
        await spool.barrier()
        junk = fill_up(small_disk.parent)
        try:
            await spool.ack([record_id for record_id, _ in claimed.records])
            await spool.barrier()
            # The delete needs room in the WAL, and there is none: the records are still there.
            assert (await spool.status()).records == held
        finally:
            junk.unlink()

    try:
        records = [SpoolRecord(1_800_000_000.0 + i, b'{"n":%d}' % i) for i in range(200)]
        assert len((await spool.append(records)).ids) == 200
        await ack_on_a_full_disk(200)
        await spool.barrier()  # the next write transaction takes the failed ack with it
        assert (await spool.status()).records == 100
        await ack_on_a_full_disk(100)
    finally:
        await spool.close()  # the close makes the failed ack once more
    reopened = await open_spool(small_disk)
    try:
        assert (await reopened.status()).records == 0
    finally:
        await reopened.close()
