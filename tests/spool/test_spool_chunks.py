"""Chunk records (spool schema 3): many signals per row, written, claimed, acked and salvaged.

Real spools on real files; the client cases talk to the emulator on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import zlib
from pathlib import Path

import pytest

from telemetrydeck_async._spool import (
    DB_NAME,
    SpoolRecord,
    _salvage,
    open_spool,
    split_chunk,
)
from telemetrydeck_async.devserver import FaultPlan, IngestEmulator
from tests.helpers import SHORT_DEADLINE, balanced, free_port, spool_client, wait_until


def bodies(start: int, count: int) -> list[bytes]:
    return [b'{"i":%d,"pad":"%s"}' % (i, b"p" * (i % 7)) for i in range(start, start + count)]


def test_chunk_record_cuts_back_into_its_signals() -> None:
    """SpoolRecord.chunk joins bodies with commas (a JSON array's inside) and splits back."""
    given = bodies(0, 5)
    record = SpoolRecord.chunk(1.0, given)
    assert record.count == 5
    assert json.loads(b"[" + record.body + b"]") == [json.loads(b) for b in given]
    assert record.bodies() == given
    assert split_chunk(record.body, record.sizes) == given
    single = SpoolRecord.chunk(1.0, given[:1])
    assert (single.count, single.sizes, single.bodies()) == (1, None, given[:1])


async def test_chunks_are_claimed_whole_and_counted_in_signals(tmp_path: Path) -> None:
    """Three chunks and one single: status counts signals, a claim hands back whole chunks."""
    spool = await open_spool(tmp_path)
    try:
        chunks = [SpoolRecord.chunk(1_800_000_000.0 + n, bodies(n * 10, 10)) for n in range(3)]
        single = SpoolRecord(1_800_000_010.0, b'{"i":99}')
        result = await spool.append([*chunks, single])
        assert (len(result.ids), result.stored, result.failed) == (4, 31, 0)
        status = await spool.status()
        assert status.records == 31
        # 15 signals per claim: two chunks do not fit in one, so each claim holds one chunk.
        first, second = await spool.claim_batches(2, 15)
        assert (first.signals, second.signals) == (10, 10)
        assert (first.bodies(), second.bodies()) == (bodies(0, 10), bodies(10, 10))
        rest = await spool.claim(100)
        assert rest.bodies() == [*bodies(20, 10), b'{"i":99}']
        await spool.ack([i for claim in (first, second, rest) for i, _ in claim.records])
        assert (await spool.status()).records == 0
    finally:
        await spool.close()


async def test_inconsistent_chunk_sizes_are_refused_and_nothing_is_stored(
    tmp_path: Path,
) -> None:
    """Sizes that do not cut the body: ValueError naming the field; the spool stays empty."""
    spool = await open_spool(tmp_path)
    try:
        good = SpoolRecord.chunk(1.0, bodies(0, 3))
        bad = SpoolRecord(1.0, good.body + b"x", good.sizes)
        with pytest.raises(ValueError, match=r"SpoolRecord\.sizes"):
            await spool.append([bad])
        assert (await spool.status()).records == 0
    finally:
        await spool.close()


_SCHEMA_2_RECORDS = """CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL, size INTEGER NOT NULL, crc INTEGER NOT NULL, owner TEXT,
    adopted INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL, dest INTEGER)"""


async def test_schema_2_file_is_migrated_and_its_records_recovered(tmp_path: Path) -> None:
    """A file of the previous version: opened, migrated to 3, every record claimed once."""
    # The previous schema, written by its own statements (from the spool's own DDL, minus the
    # two columns schema 3 added), holding one-signal rows.
    old = bodies(0, 20)
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(_SCHEMA_2_RECORDS)
        for statement in (
            "CREATE INDEX records_by_age ON records (received_at, id)",
            "CREATE INDEX records_by_dest ON records (dest, received_at, id)",
            (
                "CREATE TABLE destinations (id INTEGER PRIMARY KEY, url TEXT NOT NULL,"
                " app_id TEXT NOT NULL, UNIQUE (url, app_id))"
            ),
            (
                "CREATE TABLE owners (owner TEXT PRIMARY KEY, pid INTEGER NOT NULL,"
                " hostname TEXT NOT NULL, lease REAL NOT NULL, started_at REAL NOT NULL,"
                " heartbeat_at REAL NOT NULL, closed INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"
            ),
            (
                "CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0),"
                " records INTEGER NOT NULL, bytes INTEGER NOT NULL)"
            ),
            "INSERT INTO totals VALUES (0, 0, 0)",
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
            "PRAGMA user_version = 2",
        ):
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO records (received_at, size, crc, body) VALUES (?, ?, ?, ?)",
            [(time.time() + i, len(b), zlib.crc32(b), b) for i, b in enumerate(old)],
        )
        conn.commit()
    spool = await open_spool(tmp_path)
    try:
        assert (await spool.status()).records == 20
        await spool.append([SpoolRecord.chunk(time.time() + 100, bodies(20, 5))])
        claim = await spool.claim(1000)
        assert claim.bodies() == bodies(0, 25)
        await spool.ack(i for i, _ in claim.records)
        assert (await spool.status()).records == 0
    finally:
        await spool.close()
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (4,)


async def test_salvage_keeps_chunk_records_whose_checksum_matches(tmp_path: Path) -> None:
    """A damaged header: salvage reads chunk rows (and single rows) back with their sizes."""
    spool = await open_spool(tmp_path)
    chunks = [SpoolRecord.chunk(1_800_000_000.0 + n, bodies(n * 30, 30)) for n in range(4)]
    await spool.append([*chunks, SpoolRecord(1_800_000_009.0, b'{"single":1}')])
    await spool.close()
    db = tmp_path / DB_NAME
    with db.open("r+b") as f:
        f.write(b"\xff" * 100)  # SQLite itself refuses the file now
    found = [record for record, _ in _salvage(db)]
    assert [record.bodies() for record in found] == [
        *(bodies(n * 30, 30) for n in range(4)),
        [b'{"single":1}'],
    ]


async def test_recovered_chunk_is_acked_only_once_every_signal_is_final(tmp_path: Path) -> None:
    """A chunk split in two: one half delivered leaves it on disk; the other half handed back
    releases it (all of it is sent again later); never deleted with a signal in flight."""
    from telemetrydeck_async._spool_link import SpoolLink
    from telemetrydeck_async._stats import Accounting

    td = spool_client(f"http://127.0.0.1:{free_port()}", tmp_path)
    link = SpoolLink(td._config, Accounting())
    spool = await open_spool(tmp_path)
    link.spool = spool
    try:
        await spool.append([SpoolRecord.chunk(time.time(), bodies(0, 10))])
        (claim,) = await spool.claim_batches(1, 100)
        (batch,) = link._recovered_batches(claim, 10**6)
        assert batch.bodies == bodies(0, 10)
        first, second = batch.split()
        link.forget(first)  # delivered
        await link.settle(10)
        status = await spool.status()
        assert (status.records, status.owners[0].claimed) == (10, 10), "still held, whole"
        link.hand_back(second)  # not delivered: the chunk goes back, all ten signals
        await link.settle(10)
        assert (await spool.status()).owners[0].claimed == 0
        again = await spool.claim(100)
        assert again.bodies() == bodies(0, 10)
        (batch,) = link._recovered_batches(again, 10**6)
        first, second = batch.split()
        link.drop(first, "rejected")
        link.forget(second)
        await link.settle(10)
        assert (await spool.status()).records == 0, "every signal final: acked"
    finally:
        await spool.close()
        await td.aclose()


@pytest.mark.parametrize("fault", ["too_large", "rejected"])
async def test_recovered_chunks_split_by_413_or_400_are_delivered_and_acked(
    tmp_path: Path, fault: str
) -> None:
    """Spooled chunks sent to an endpoint that answers 413 (or 400 for one marked signal):
    the halves are delivered, the marked one dropped, and the spool ends empty."""
    port = free_port()
    down = spool_client(
        f"http://127.0.0.1:{port}", tmp_path, max_queue_size=10, retry=SHORT_DEADLINE
    )
    await down.start()
    await wait_until(lambda: down._flusher.link.spool is not None)
    for i in range(300):
        payload: dict[str, object] = {"Test.id": i}
        if fault == "rejected" and i == 150:
            payload["Test.poison"] = True
        down.signal_nowait("Chunk.case", payload=payload)
    await down.aclose(timeout=30)
    assert down.stats.spooled == 300
    assert balanced(down.stats)
    if fault == "too_large":
        faults = FaultPlan(max_body_bytes=30_000)  # about 50 signals: every chunk splits
    else:
        faults = FaultPlan(reject_marker="Test.poison")
    async with IngestEmulator(port=port, faults=faults) as emulator:
        td = spool_client(emulator.base_url, tmp_path)
        await td.start()
        expected = set(range(300)) - ({150} if fault == "rejected" else set())
        assert await wait_until(lambda: expected <= emulator.distinct_ids())
        assert await wait_until(lambda: td.stats.spool_records == 0)
        stats = td.stats
        await td.aclose(timeout=10)
    assert emulator.distinct_ids() == expected
    assert emulator.duplicates() == 0
    if fault == "rejected":
        assert stats.spool_dropped == {"rejected": 1}
    assert stats.recovered == len(expected)


def rows_on_disk(spool_dir: Path) -> int:
    """Signals committed to the spool file, read by SQLite (read-only) from this thread."""
    uri = f"file:{spool_dir / DB_NAME}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        (count,) = conn.execute("SELECT coalesce(sum(count), 0) FROM records").fetchone()
    return int(count)


async def test_burst_that_never_yields_is_written_while_it_runs(tmp_path: Path) -> None:
    """signal_nowait() in a loop that never lets the event loop turn: the overflow is
    written meanwhile (seen on disk before the loop runs again); none dropped."""
    td = spool_client(
        f"http://127.0.0.1:{free_port()}", tmp_path, max_queue_size=10, retry=SHORT_DEADLINE
    )
    await td.start()
    assert await wait_until(lambda: td._flusher.link.spool is not None)
    for i in range(1_000):
        td.signal_nowait("Chunk.burst", payload={"Test.id": i})
        assert balanced(td.stats)
    # Still inside the burst's turn of the loop: poll the file from this thread, blocking.
    deadline = time.monotonic() + 60
    while rows_on_disk(tmp_path) < 800 and time.monotonic() < deadline:
        time.sleep(0.01)  # noqa: ASYNC251  (the point: the loop must not turn)
    written_during_burst = rows_on_disk(tmp_path)
    # Nine full chunks: each written when the next is sealed (or by the spool's thread when
    # a write of its own held the lock), the last at the next turn of the loop.
    assert written_during_burst >= 800, "full chunks reach the disk without a loop turn"
    assert balanced(td.stats)
    assert await wait_until(lambda: rows_on_disk(tmp_path) >= 900)
    await td.aclose(timeout=30)
    stats = td.stats
    assert stats.dropped == {}
    assert stats.spooled == 1_000
    assert balanced(stats)


async def test_overflow_before_the_spool_has_opened_waits_for_it(tmp_path: Path) -> None:
    """A burst in the same turn as start(): the spool cannot be open yet; its chunks wait in
    memory (pending, bounded) and are written once it is; none dropped."""
    td = spool_client(
        f"http://127.0.0.1:{free_port()}", tmp_path, max_queue_size=10, retry=SHORT_DEADLINE
    )
    for i in range(500):  # before start(): the client starts itself, the spool opens later
        td.signal_nowait("Chunk.early", payload={"Test.id": i})
    assert td._flusher.link.spool is None, "opening needs a turn of the loop and a thread"
    assert balanced(td.stats)
    assert td.stats.pending == 500
    await td.aclose(timeout=30)
    stats = td.stats
    assert stats.dropped == {}
    assert stats.spooled == 500
    assert balanced(stats)
