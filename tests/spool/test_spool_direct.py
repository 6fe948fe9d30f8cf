"""Direct writes (``Spool.append_now``): overflow chunks committed on the event loop's thread.

Real spools on real files; the client cases aim at a loopback port nothing listens on.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from telemetrydeck_async import _spool
from telemetrydeck_async._spool import DB_NAME, SpoolRecord, open_spool
from tests.helpers import SHORT_DEADLINE, balanced, free_port, spool_client, wait_until
from tests.spool.test_spool_chunks import rows_on_disk


def signal_bodies(texts: list[str]) -> list[bytes]:
    """Signal objects as the client encodes them: ``appID`` first, a flat payload."""
    return [
        json.dumps(
            {"appID": "A", "type": text, "payload": {text: text, "n": i}},
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        for i, text in enumerate(texts)
    ]


@pytest.fixture
def never_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    """No direct write counts as slow: a busy shared disk must not pause them in these tests."""
    monkeypatch.setattr(_spool, "_DIRECT_SLOW", 60.0)


@pytest.mark.usefixtures("never_slow")
async def test_append_now_commits_before_it_returns_and_never_waits(tmp_path: Path) -> None:
    """Stored pending in the call itself; None (hand it over) while another connection holds
    the write lock, for durability "always", and once closed."""
    spool = await open_spool(tmp_path)
    record = SpoolRecord.chunk(1_800_000_000.0, signal_bodies(["a", "b"]))
    try:
        result = spool.append_now(record)
        assert result is not None
        assert (result.stored, result.failed, len(result.ids)) == (2, 0, 1)
        assert rows_on_disk(tmp_path) == 2, "on disk before any await"
        with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)) as rival:
            rival.execute("BEGIN IMMEDIATE")
            assert spool.append_now(record) is None, "busy: not waited for on the loop"
            rival.execute("ROLLBACK")
        assert spool.append_now(record) is not None
        claimed = await spool.claim(100)
        assert claimed.bodies() == record.bodies() * 2
    finally:
        await spool.close()
    assert spool.append_now(record) is None
    always = await open_spool(tmp_path / "always", durability="always")
    try:
        assert always.append_now(record) is None, "each commit is fsynced: never on the loop"
    finally:
        await always.close()


@pytest.mark.usefixtures("never_slow")
async def test_direct_writes_are_checkpointed_by_the_worker(tmp_path: Path) -> None:
    """Commits no longer checkpoint by themselves: the worker thread, told about the direct
    writes, moves them into the database file while the spool stays open."""
    spool = await open_spool(tmp_path)
    try:
        body = signal_bodies(["x" * 1000] * 100)
        for n in range(40):
            assert spool.append_now(SpoolRecord.chunk(1_800_000_000.0 + n, body)) is not None
        written = 40 * sum(map(len, body))
        database = tmp_path / DB_NAME
        assert await wait_until(lambda: database.stat().st_size > written)
        assert (await spool.status()).records == 4_000
    finally:
        await spool.close()


async def test_overflow_goes_to_the_thread_while_another_writer_holds_the_lock(
    tmp_path: Path,
) -> None:
    """Another connection writing: chunks wait for the spool's thread (pending, counted), and
    all reach the disk once the lock is free; none dropped."""
    td = spool_client(
        f"http://127.0.0.1:{free_port()}", tmp_path, max_queue_size=10, retry=SHORT_DEADLINE
    )
    await td.start()
    await td._flusher.link.ready(30)
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)) as rival:
        rival.execute("BEGIN IMMEDIATE")
        for i in range(510):
            td.signal_nowait("Direct.busy", payload={"Test.id": i})
        assert td.stats.spooled == 0
        assert td.stats.pending == 510
        assert balanced(td.stats)
        rival.execute("COMMIT")
    assert await wait_until(lambda: td.stats.spooled == 500)
    await td.aclose(timeout=30)
    assert td.stats.dropped == {}
    assert td.stats.spooled == 510
    assert rows_on_disk(tmp_path) == 510


async def test_a_slow_direct_write_hands_the_next_ones_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that took long (the disk made it wait) pauses direct writes for a while: the
    loop must not wait like that again soon; the worker thread takes them meanwhile."""
    spool = await open_spool(tmp_path)
    record = SpoolRecord.chunk(1_800_000_000.0, signal_bodies(["a", "b"]))
    try:
        monkeypatch.setattr(_spool, "_DIRECT_SLOW", -1.0)  # every write counts as slow
        assert spool.append_now(record) is not None, "the slow write itself is stored"
        assert spool.append_now(record) is None, "paused: hand it to the thread"
        monkeypatch.setattr(_spool, "_DIRECT_PAUSE", 0.0)
        monkeypatch.setattr(spool, "_direct_paused_until", -1.0)
        monkeypatch.setattr(_spool, "_DIRECT_SLOW", 60.0)
        assert spool.append_now(record) is not None, "the pause ends"
        assert rows_on_disk(tmp_path) == 4
    finally:
        await spool.close()


@pytest.mark.usefixtures("never_slow")
async def test_append_many_now_commits_several_chunks_in_one_transaction(tmp_path: Path) -> None:
    """Several chunks in one direct write: one result per chunk, in order, all on disk when it
    returns; nothing of them when another connection holds the write lock."""
    spool = await open_spool(tmp_path)
    chunks = [signal_bodies([f"{n}-{i}" for i in range(3)]) for n in range(4)]
    records = [
        SpoolRecord.chunk(1_800_000_000.0 + n, chunk, compress=True)
        for n, chunk in enumerate(chunks)
    ]
    try:
        with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)) as rival:
            rival.execute("BEGIN IMMEDIATE")
            assert spool.append_many_now(records) is None, "busy: all of them handed over"
            rival.execute("ROLLBACK")
        assert rows_on_disk(tmp_path) == 0
        results = spool.append_many_now(records)
        assert results is not None
        assert [r.stored for r in results] == [3, 3, 3, 3]
        ids = [r.ids[0] for r in results]
        assert ids == sorted(ids)
        assert len(set(ids)) == 4
        assert rows_on_disk(tmp_path) == 12, "on disk before any await"
        claimed = await spool.claim(100)
        assert claimed.bodies() == [body for chunk in chunks for body in chunk]
    finally:
        await spool.close()
