"""The on-disk spool: real SQLite files in tmp_path, real worker processes, no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from telemetrydeck_async._spool import (
    AppendResult,
    ClaimResult,
    Spool,
    SpoolRecord,
    open_spool,
)
from telemetrydeck_async.exceptions import ConfigurationError, SpoolError

#: Part of the fast core CI also runs on the installed wheel (oldest and newest Python).
pytestmark = pytest.mark.core

WORKER = Path(__file__).resolve().parents[1] / "scripts" / "spool_worker.py"
LOGGER = "telemetrydeck_async"


class FakeClock:
    """A unix clock that only moves when a test moves it."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def body(i: int, pad: int = 0) -> bytes:
    """A small JSON object, distinct for every i, all of one length for one ``pad``."""
    return b'{"i":"%06d","pad":"%s"}' % (i, b"p" * pad)


def records(
    count: int, *, start: int = 0, at: float | None = None, pad: int = 0
) -> list[SpoolRecord]:
    """``count`` records with increasing received_at (one second apart)."""
    base = time.time() if at is None else at
    return [SpoolRecord(base + i, body(start + i, pad)) for i in range(count)]


def ids_of(claim: ClaimResult) -> list[int]:
    return [record_id for record_id, _ in claim.records]


def bodies_of(claim: ClaimResult) -> list[bytes]:
    return [data for _, data in claim.records]


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    """An open spool in a fresh directory, closed afterwards."""
    opened = await open_spool(tmp_path / "spool")
    yield opened
    await opened.close()


def run_worker(*args: str) -> subprocess.Popen[str]:
    """Start ``tests/scripts/spool_worker.py`` in a new interpreter."""
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def problems(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Log records at WARNING or above from the package logger."""
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------------------------
# Basic operations


async def test_claim_returns_oldest_received_first(spool: Spool) -> None:
    """Records are claimed in received_at order, not in the order they were appended."""
    now = time.time()
    given = [SpoolRecord(now - age, body(age)) for age in (5, 50, 1, 30)]
    await spool.append(given)
    claim = await spool.claim(10)
    assert bodies_of(claim) == [body(50), body(30), body(5), body(1)]


async def test_append_returns_ids_in_order(spool: Spool) -> None:
    """The ids of an append name the given records, in order."""
    result = await spool.append(records(3))
    assert result == AppendResult(result.ids, 0, 0, 0, 3)
    claim = await spool.claim(3)
    assert dict(claim.records) == dict(zip(result.ids, (body(0), body(1), body(2)), strict=True))


async def test_claim_respects_limit_and_max_bytes(spool: Spool) -> None:
    """A claim stops at ``limit`` records and at ``max_bytes`` of body, but takes at least one."""
    await spool.append(records(10, pad=90))
    size = len(body(0, 90))
    assert len((await spool.claim(3)).records) == 3
    assert len((await spool.claim(10, max_bytes=2 * size + 1)).records) == 2
    assert len((await spool.claim(10, max_bytes=1)).records) == 1


async def test_claim_batches_hands_out_several_batches_in_order(spool: Spool) -> None:
    """claim_batches: consecutive batches, oldest first, each within limit and max_bytes."""
    await spool.append(records(25, pad=90))
    size = len(body(0, 90))
    claims = await spool.claim_batches(3, 4)
    assert [bodies_of(c) for c in claims] == [
        [body(i, 90) for i in range(start, start + 4)] for start in (0, 4, 8)
    ]
    claims = await spool.claim_batches(5, 10, max_bytes=2 * size + 1)
    assert [len(c.records) for c in claims] == [2, 2, 2, 2, 2]
    assert bodies_of(claims[0])[0] == body(12, 90)
    claims = await spool.claim_batches(4, 10)
    assert [len(c.records) for c in claims] == [3], "fewer batches when the spool runs out"
    assert await spool.claim_batches(2, 10) == (ClaimResult((), 0, 0),)


async def test_claim_batches_reports_expired_once(tmp_path: Path) -> None:
    """Expired records are counted in the first result only."""
    clock = FakeClock()
    opened = await open_spool(tmp_path, max_age=100, clock=clock)
    try:
        await opened.append(records(3, at=clock.now - 1_000))
        await opened.append(records(6, start=3, at=clock.now))
        claims = await opened.claim_batches(3, 2)
        assert [(len(c.records), c.expired) for c in claims] == [(2, 3), (2, 0), (2, 0)]
    finally:
        await opened.close()


async def test_acked_records_are_gone(spool: Spool) -> None:
    """Acked records are deleted; the rest stay pending."""
    await spool.append(records(4))
    first = await spool.claim(2)
    await spool.ack(ids_of(first))
    rest = await spool.claim(10)
    assert bodies_of(rest) == [body(2), body(3)]
    await spool.ack(ids_of(rest))
    assert (await spool.status()).records == 0


async def test_released_records_are_claimable_again(spool: Spool) -> None:
    """Released records become pending again, in their original place in the order."""
    await spool.append(records(3))
    first = await spool.claim(2)
    assert (await spool.claim(1)).records[0][1] == body(2)
    await spool.release(ids_of(first))
    assert bodies_of(await spool.claim(10)) == [body(0), body(1)]


async def test_claimed_records_are_not_claimed_twice(spool: Spool) -> None:
    """A claimed record is not handed out again by the next claim."""
    await spool.append(records(5))
    first = await spool.claim(3)
    second = await spool.claim(10)
    assert not set(ids_of(first)) & set(ids_of(second))
    assert len(first.records) + len(second.records) == 5


async def test_ids_are_never_reused(spool: Spool) -> None:
    """After acking everything, new records get new ids (a stale ack cannot hit them)."""
    old = await spool.append(records(3))
    await spool.ack(ids_of(await spool.claim(3)))
    new = await spool.append(records(3))
    assert min(new.ids) > max(old.ids)


async def test_empty_arguments_do_nothing(spool: Spool) -> None:
    """Empty appends, acks and releases and a zero limit are no-ops."""
    assert await spool.append([]) == AppendResult((), 0, 0)
    assert await spool.claim(0) == ClaimResult((), 0, 0)
    await spool.ack([])
    await spool.release([])
    assert (await spool.status()).records == 0


async def test_invalid_record_is_refused(spool: Spool) -> None:
    """A body that is not bytes is a programming error and raises TypeError."""
    with pytest.raises(TypeError, match="bytes"):
        await spool.append([SpoolRecord(time.time(), "text")])  # type: ignore[arg-type]  # reason: the error under test


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_bytes", 0), ("max_age", -1.0), ("durability", "sometimes"), ("lease", 0.0)],
)
async def test_invalid_options_raise_configuration_error(
    tmp_path: Path, option: str, value: Any
) -> None:
    """Bad open_spool options raise ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match=option):
        await open_spool(tmp_path, **{option: value})


# --------------------------------------------------------------------------------------------
# Status, heartbeat, close


async def test_status_reports_counts_ages_and_owner(spool: Spool) -> None:
    """status() counts records and bytes, gives the oldest and newest time, and lists owners."""
    given = records(3, at=1_700_000_000.0)
    await spool.append(given, claimed=True)
    status = await spool.status()
    assert (status.records, status.bytes) == (3, sum(len(r.body) for r in given))
    assert (status.oldest_received_at, status.newest_received_at) == (
        1_700_000_000.0,
        1_700_000_002.0,
    )
    (me,) = status.owners
    assert (me.owner_id, me.pid, me.claimed, me.alive, me.closed) == (
        spool.owner_id,
        os.getpid(),
        3,
        True,
        False,
    )
    assert status.path == str(spool.path)
    assert not status.disabled


async def test_heartbeat_keeps_owner_alive_past_its_lease(tmp_path: Path) -> None:
    """An owner that heartbeats keeps its records even after its original lease ran out."""
    clock = FakeClock()
    holder = await open_spool(tmp_path, lease=10.0, clock=clock)
    other = await open_spool(tmp_path, lease=10.0, clock=clock)
    try:
        await holder.append(records(2, at=clock.now), claimed=True)
        for _ in range(3):
            clock.now += 8.0
            await holder.heartbeat()
        assert (await other.claim(10)).records == ()
    finally:
        await holder.close()
        await other.close()


async def test_owner_without_heartbeat_is_adopted_after_lease(tmp_path: Path) -> None:
    """Records of an owner whose heartbeat is older than its lease are taken over."""
    clock = FakeClock()
    holder = await open_spool(tmp_path, lease=10.0, clock=clock)
    other = await open_spool(tmp_path, lease=10.0, clock=clock)
    try:
        await holder.append(records(2, at=clock.now), claimed=True)
        assert (await other.claim(10)).records == ()
        clock.now += 11.0
        claim = await other.claim(10)
        assert (len(claim.records), claim.adopted) == (2, 2)
    finally:
        await holder.close()
        await other.close()


async def test_closed_owner_records_are_adopted_at_once(tmp_path: Path) -> None:
    """close() leaves claimed records owned by a closed owner: the next claim adopts them."""
    holder = await open_spool(tmp_path)
    other = await open_spool(tmp_path)
    try:
        await holder.append(records(3), claimed=True)
        assert (await other.claim(10)).records == ()
        await holder.close()
        claim = await other.claim(10)
        assert (bodies_of(claim), claim.adopted) == ([body(0), body(1), body(2)], 3)
    finally:
        await other.close()


async def test_close_is_idempotent_and_later_calls_return_empty(tmp_path: Path) -> None:
    """After close() the spool answers with empty results and never raises."""
    opened = await open_spool(tmp_path)
    await opened.close()
    await opened.close()
    assert (await opened.append(records(2))).failed == 2
    assert (await opened.claim(5)).records == ()
    await opened.ack([1])
    assert opened.closed


async def test_cancelled_claim_gives_its_records_back(spool: Spool) -> None:
    """A claim cancelled while the thread works does not leave records owned by nobody."""
    await spool.append(records(5))
    task = asyncio.ensure_future(spool.claim(5))
    await asyncio.sleep(0)  # the job is queued
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # Each heartbeat round trip lets a pending give-back reach the queue and then the disk.
    await spool.heartbeat()
    await spool.heartbeat()
    assert len((await spool.claim(10)).records) == 5


# --------------------------------------------------------------------------------------------
# Size and age limits


async def test_max_bytes_evicts_oldest_records(tmp_path: Path) -> None:
    """Appending beyond max_bytes deletes the oldest records and counts them."""
    size = len(body(0, 90))
    opened = await open_spool(tmp_path, max_bytes=10 * size)
    try:
        await opened.append(records(10, pad=90))
        result = await opened.append(records(3, start=10, at=time.time() + 100, pad=90))
        assert (len(result.ids), result.evicted, result.failed) == (3, 3, 0)
        claim = await opened.claim(100)
        assert bodies_of(claim) == [body(i, 90) for i in range(3, 13)]
    finally:
        await opened.close()


async def test_max_bytes_evicts_records_of_any_owner(tmp_path: Path) -> None:
    """Eviction also takes claimed records, oldest first."""
    size = len(body(0, 90))
    opened = await open_spool(tmp_path, max_bytes=4 * size)
    try:
        await opened.append(records(4, pad=90), claimed=True)
        result = await opened.append(records(2, start=4, at=time.time() + 100, pad=90))
        assert result.evicted == 2
        assert (await opened.status()).records == 4
    finally:
        await opened.close()


async def test_batch_larger_than_max_bytes_keeps_its_newest(tmp_path: Path) -> None:
    """A batch that alone exceeds max_bytes keeps its last records (the rest rejected)."""
    size = len(body(0, 90))
    opened = await open_spool(tmp_path, max_bytes=3 * size)
    try:
        result = await opened.append(records(5, pad=90))
        assert (len(result.ids), result.rejected, result.evicted) == (3, 2, 0)
        claim = await opened.claim(10)
        assert dict(claim.records) == dict(
            zip(result.ids, [body(i, 90) for i in (2, 3, 4)], strict=True)
        )
    finally:
        await opened.close()


async def test_expired_records_are_deleted_and_counted(tmp_path: Path) -> None:
    """A claim deletes pending records older than max_age and reports how many."""
    clock = FakeClock()
    opened = await open_spool(tmp_path, max_age=3600.0, clock=clock)
    try:
        await opened.append(records(2, at=clock.now - 7200))
        await opened.append(records(3, start=2, at=clock.now - 60))
        claim = await opened.claim(10)
        assert (claim.expired, bodies_of(claim)) == (2, [body(2), body(3), body(4)])
        assert (await opened.status()).records == 3
    finally:
        await opened.close()


async def test_claimed_records_of_a_live_owner_do_not_expire(tmp_path: Path) -> None:
    """Expiry leaves records alone while a live owner is sending them."""
    clock = FakeClock()
    holder = await open_spool(tmp_path, max_age=3600.0, clock=clock)
    other = await open_spool(tmp_path, max_age=3600.0, clock=clock)
    try:
        await holder.append(records(2, at=clock.now - 7200), claimed=True)
        assert (await other.claim(10)).expired == 0
        assert (await other.status()).records == 2
    finally:
        await holder.close()
        await other.close()


# --------------------------------------------------------------------------------------------
# Files on disk


async def test_directory_is_0700_and_files_are_0600(tmp_path: Path) -> None:
    """The spool directory is private to the user and so are the database, WAL and lock."""
    directory = tmp_path / "nested" / "spool"
    opened = await open_spool(directory)
    try:
        await opened.append(records(3))
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        names = ["spool.sqlite3", "spool.sqlite3-wal", "spool.sqlite3-shm", "spool.lock"]
        for name in names:
            assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    finally:
        await opened.close()


async def test_loose_file_modes_are_tightened(tmp_path: Path) -> None:
    """A database file left world-readable by someone else is set to 0600 on open."""
    (tmp_path / "spool.sqlite3").touch(mode=0o644)
    os.chmod(tmp_path / "spool.sqlite3", 0o644)
    opened = await open_spool(tmp_path)
    await opened.close()
    assert stat.S_IMODE((tmp_path / "spool.sqlite3").stat().st_mode) == 0o600


async def test_only_the_given_bodies_are_stored(tmp_path: Path) -> None:
    """The database holds exactly the bytes handed in, nothing derived from elsewhere."""
    opened = await open_spool(tmp_path)
    await opened.append([SpoolRecord(time.time(), b'{"clientUser":"5e88"}')])
    await opened.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.sqlite3")) as conn:
        assert conn.execute("SELECT body FROM records").fetchall() == [(b'{"clientUser":"5e88"}',)]


# --------------------------------------------------------------------------------------------
# Damaged files


async def fill_and_close(directory: Path, count: int = 400) -> set[bytes]:
    """Write ``count`` records and close, so everything sits in the main database file."""
    opened = await open_spool(directory)
    given = records(count, pad=120)
    await opened.append(given)
    await opened.close()
    return {r.body for r in given}


async def reopen_and_read(directory: Path) -> tuple[Spool, set[bytes]]:
    """Open the spool again; return it (still open) with every body it can hand out."""
    opened = await open_spool(directory)
    claim = await opened.claim(100_000)
    await opened.release(ids_of(claim))
    return opened, set(bodies_of(claim))


async def assert_usable(opened: Spool) -> None:
    """The spool stores and hands out new records."""
    assert not opened.disabled
    result = await opened.append([SpoolRecord(time.time() + 10**6, b'{"after":1}')])
    assert result.failed == 0
    claim = await opened.claim(100_000)
    assert b'{"after":1}' in bodies_of(claim)


def aside_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool.sqlite3.corrupt-*"))


async def test_zero_length_database_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty file (cut to nothing by something else) is moved aside, once, and replaced."""
    (tmp_path / "spool.sqlite3").write_bytes(b"")
    opened, kept = await reopen_and_read(tmp_path)
    try:
        assert kept == set()
        (aside,) = aside_files(tmp_path)
        assert aside.stat().st_size == 0
        (problem,) = problems(caplog)
        assert "zero length" in problem.getMessage()
        assert str(aside) in problem.getMessage()
        await assert_usable(opened)
    finally:
        await opened.close()


async def test_non_sqlite_file_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that is not a database is moved aside, reported once, and a fresh one used."""
    (tmp_path / "spool.sqlite3").write_bytes(b"this is not a database\n" * 500)
    opened, kept = await reopen_and_read(tmp_path)
    try:
        assert kept == set()
        (aside,) = aside_files(tmp_path)
        assert aside.read_bytes().startswith(b"this is not a database")
        assert len(problems(caplog)) == 1
        assert "damaged" in problems(caplog)[0].getMessage()
        await assert_usable(opened)
    finally:
        await opened.close()


@pytest.mark.parametrize("cut", [10, 100, 4096, 0.25, 0.5, 0.75, 0.9])
async def test_truncated_database_keeps_what_is_readable(tmp_path: Path, cut: float) -> None:
    """A database cut short opens; the records that can still be read are kept."""
    given = await fill_and_close(tmp_path)
    path = tmp_path / "spool.sqlite3"
    size = path.stat().st_size
    offset = int(cut) if cut >= 1 else int(size * cut) // 4096 * 4096
    os.truncate(path, offset)
    opened, kept = await reopen_and_read(tmp_path)
    try:
        assert kept <= given
        if isinstance(cut, float) and cut >= 0.5:
            assert kept, "the pages before the cut hold readable records"
        assert len(aside_files(tmp_path)) == 1
        await assert_usable(opened)
    finally:
        await opened.close()


@pytest.mark.parametrize("seed", range(6))
async def test_overwritten_pages_keep_what_is_readable(tmp_path: Path, seed: int) -> None:
    """Random pages overwritten with garbage: the spool opens and keeps only intact records."""
    given = await fill_and_close(tmp_path)
    path = tmp_path / "spool.sqlite3"
    rng = random.Random(seed)
    pages = path.stat().st_size // 4096
    with path.open("r+b") as f:
        for page in rng.sample(range(1, pages), 3):
            f.seek(page * 4096)
            f.write(rng.randbytes(4096))
    opened, kept = await reopen_and_read(tmp_path)
    try:
        assert kept <= given
        await assert_usable(opened)
    finally:
        await opened.close()


async def test_garbage_header_is_moved_aside(tmp_path: Path) -> None:
    """A database whose header was overwritten is moved aside; rows on other pages are kept."""
    given = await fill_and_close(tmp_path)
    with (tmp_path / "spool.sqlite3").open("r+b") as f:
        f.write(bytes(range(100)))
    opened, kept = await reopen_and_read(tmp_path)
    try:
        assert kept == given  # page 1 holds the schema, never a record
        assert len(aside_files(tmp_path)) == 1
        await assert_usable(opened)
    finally:
        await opened.close()


def kill_holder(directory: Path, count: int) -> list[int]:
    """Run a worker that appends claimed records, SIGKILL it, reap it; return its ids."""
    proc = run_worker("hold", str(directory), str(count))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "worker printed nothing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    ids: list[int] = json.loads(line)["ids"]
    return ids


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.7])
async def test_truncated_wal_opens(tmp_path: Path, keep: float) -> None:
    """A WAL cut short after a crash opens; whatever survives is intact."""
    kill_holder(tmp_path, 200)
    wal = tmp_path / "spool.sqlite3-wal"
    if wal.exists():
        os.truncate(wal, int(wal.stat().st_size * keep))
    opened, kept = await reopen_and_read(tmp_path)
    try:
        assert kept <= {b'{"hold":%d}' % i for i in range(200)}
        await assert_usable(opened)
    finally:
        await opened.close()


async def test_database_replaced_underneath_is_reopened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When another process swaps the file (its repair), an open spool follows, never raises."""
    opened = await open_spool(tmp_path)
    try:
        await opened.append(records(3))
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(tmp_path / f"spool.sqlite3{suffix}", tmp_path / f"moved{suffix}")
        (tmp_path / "spool.sqlite3").write_bytes(b"garbage " * 1000)
        await assert_usable(opened)
        assert len(aside_files(tmp_path)) == 1
    finally:
        await opened.close()


async def test_damage_found_while_open_is_repaired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A page going bad under an open spool: the failing call returns empty, the spool repairs."""
    opened = await open_spool(tmp_path)
    try:
        given = {r.body for r in records(400, pad=120)}
        await opened.append(records(400, pad=120))
        # Move everything into the main file so the damage below is what the spool reads next.
        with contextlib.closing(sqlite3.connect(tmp_path / "spool.sqlite3")) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        path = tmp_path / "spool.sqlite3"
        pages = path.stat().st_size // 4096
        with path.open("r+b") as f:
            for page in range(pages // 2, pages // 2 + 4):
                f.seek(page * 4096)
                f.write(random.Random(page).randbytes(4096))
        assert (await opened.claim(10_000)).records == ()  # this read hits the damage
        assert len(aside_files(tmp_path)) == 1
        assert any("damaged" in r.getMessage() for r in problems(caplog))
        kept = set(bodies_of(await opened.claim(10_000)))
        assert kept <= given
        await assert_usable(opened)
    finally:
        await opened.close()


async def test_database_of_a_newer_version_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A schema this version does not know: disabled, logged once, the file untouched."""
    path = tmp_path / "spool.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    before = path.read_bytes()
    opened = await open_spool(tmp_path)
    try:
        assert opened.disabled
        assert (await opened.append(records(1))).failed == 1
        assert path.read_bytes() == before
        assert aside_files(tmp_path) == []
        assert len(problems(caplog)) == 1
        assert "schema version 99" in problems(caplog)[0].getMessage()
    finally:
        await opened.close()


# --------------------------------------------------------------------------------------------
# Unusable directories and full disks


async def test_directory_that_is_a_file_disables_the_spool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spool path that is a regular file: disabled, logged once, methods never raise."""
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    opened = await open_spool(path)
    try:
        assert opened.disabled
        assert await opened.append(records(2)) == AppendResult((), 2, 0)
        assert await opened.append(records(1), claimed=True) == AppendResult((), 1, 0)
        assert await opened.claim(10) == ClaimResult((), 0, 0)
        await opened.ack([1, 2])
        await opened.release([1])
        await opened.heartbeat()
        assert (await opened.status()).disabled
        assert opened.append_sync(records(1)).failed == 1
        assert opened.failed == 4
        assert len(problems(caplog)) == 1
        assert "memory only" in problems(caplog)[0].getMessage()
    finally:
        await opened.close()


async def test_directory_below_a_file_disables_the_spool(tmp_path: Path) -> None:
    """A path below a regular file (ENOTDIR, even for root) gives a disabled spool."""
    (tmp_path / "file").write_text("x")
    opened = await open_spool(tmp_path / "file" / "spool")
    try:
        assert opened.disabled
        assert (await opened.append(records(1))).failed == 1
    finally:
        await opened.close()


async def test_read_only_directory_disables_the_spool(tmp_path: Path) -> None:
    """A directory the process may not write to gives a disabled spool."""
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        try:
            (directory / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("running as root: permission bits do not stop writes here")
        opened = await open_spool(directory)
        try:
            assert opened.disabled
            assert (await opened.append(records(1))).failed == 1
        finally:
            await opened.close()
    finally:
        directory.chmod(0o700)


def test_append_sync_into_a_vanished_directory_fails_quietly(tmp_path: Path) -> None:
    """append_sync where the directory is gone (now a file) counts the records as failed."""
    directory = tmp_path / "spool"
    opened = asyncio.run(open_spool(directory))
    asyncio.run(opened.close())
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    directory.write_text("not a directory any more")
    assert opened.append_sync(records(2)) == AppendResult((), 2, 0)
    assert opened.failed == 2


def test_full_disk_fails_writes_without_raising(tmp_path: Path) -> None:
    """Writes past a file-size limit fail and are counted; the process never sees an error.

    A real tiny filesystem needs mount privileges this test cannot count on; RLIMIT_FSIZE makes
    write() fail (EFBIG) at a set size, which reaches SQLite just like ENOSPC does.
    """
    if sys.platform == "win32":  # pragma: no cover
        pytest.skip("RLIMIT_FSIZE is POSIX only")
    proc = run_worker("fsize", str(tmp_path / "spool"), str(300_000))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["stored"] > 0
    assert summary["failed"] > 0
    assert summary["stored"] + summary["failed"] == 200 * 50
    assert not summary["disabled"]
    assert "Traceback" not in err.split("spool")[0]  # only our logged warnings, no crash


# --------------------------------------------------------------------------------------------
# Processes


async def test_records_of_a_killed_process_are_adopted(tmp_path: Path) -> None:
    """Claimed records of a live owner are off limits; after SIGKILL they are adopted once."""
    proc = run_worker("hold", str(tmp_path), "20")
    other = await open_spool(tmp_path)
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        held = json.loads(line)["ids"]
        assert (await other.claim(100)).records == ()
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.communicate)
        claim = await other.claim(100)
        assert (ids_of(claim), claim.adopted) == (held, 20)
        assert bodies_of(claim) == [b'{"hold":%d}' % i for i in range(20)]
        assert (await other.claim(100)).records == ()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.to_thread(proc.communicate)
        await other.close()


def process_state(pid: int) -> str:
    """The state letter of a process from /proc (R, S, Z...)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
async def test_records_of_an_unreaped_zombie_are_adopted(tmp_path: Path) -> None:
    """A killed worker its parent has not reaped yet (a zombie) counts as dead."""
    proc = run_worker("hold", str(tmp_path), "5")
    other = await open_spool(tmp_path)
    try:
        assert proc.stdout is not None
        await asyncio.to_thread(proc.stdout.readline)
        proc.send_signal(signal.SIGKILL)
        for _ in range(1000):  # wait for the kernel to finish the kill (no reaping: no wait())
            if process_state(proc.pid) == "Z":
                break
            await asyncio.sleep(0.005)
        claim = await other.claim(100)
        assert (len(claim.records), claim.adopted) == (5, 5)
    finally:
        await asyncio.to_thread(proc.communicate)
        await other.close()


async def test_four_processes_share_one_spool(tmp_path: Path) -> None:
    """Four workers draining one directory: no record acked twice, none lost."""
    directory = tmp_path / "spool"
    prefill = await open_spool(directory)
    await prefill.append(records(400))
    await prefill.close()
    procs = [
        run_worker("crunch", str(directory), str(tmp_path / f"acked-{n}"), str(n), "150")
        for n in range(4)
    ]
    errors = []
    for proc in procs:
        _, err = await asyncio.to_thread(proc.communicate, None, 120)
        assert proc.returncode == 0, err
        errors.append(err)
    acked = Counter[str]()
    for n in range(4):
        acked.update((tmp_path / f"acked-{n}").read_text().splitlines())
    expected = {body(i).decode() for i in range(400)} | {
        f'{{"w":{n},"i":{i}}}' for n in range(4) for i in range(150)
    }
    assert [line for line, times in acked.items() if times > 1] == [], errors
    assert set(acked) == expected
    final = await open_spool(directory)
    try:
        assert (await final.status()).records == 0, errors
    finally:
        await final.close()


async def test_wal_survives_other_connections_coming_and_going(tmp_path: Path) -> None:
    """Another process closing its connection does not delete the WAL of an open spool.

    Regression: opening and closing a descriptor of the database file in this process drops
    the SHARED lock SQLite holds for WAL mode, so the other process would take itself for the
    last user, delete the WAL, and leave the two processes writing to different logs.
    """
    opened = await open_spool(tmp_path)
    try:
        await opened.append(records(3))
        opened.append_sync(records(2, start=3))  # a second connection in this process
        visitor = run_worker("visit", str(tmp_path))
        _, err = await asyncio.to_thread(visitor.communicate, None, 60)
        assert visitor.returncode == 0, err
        assert (tmp_path / "spool.sqlite3-wal").exists()
        await opened.append(records(1, start=5))
        assert len((await opened.claim(10)).records) == 6
    finally:
        await opened.close()


def test_fork_child_cannot_use_the_parent_spool(tmp_path: Path) -> None:
    """In a forked child every method raises SpoolError telling it to open its own spool."""
    if not hasattr(os, "fork"):  # pragma: no cover
        pytest.skip("no fork() here")
    loop = asyncio.new_event_loop()
    try:
        opened = loop.run_until_complete(open_spool(tmp_path))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            # The direct writer never raises: None, the parent's connection left untouched.
            direct = repr(opened.append_now(records(1)[0])).encode()
            outcome = b"no error"
            try:
                opened.append_sync(records(1))
            except SpoolError as exc:
                outcome = b"SpoolError: " + str(exc).encode()
            os.write(write, direct + b"|" + outcome)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            direct, outcome = pipe.read().split(b"|", 1)
        os.waitpid(pid, 0)
        assert direct == b"None"
        assert outcome.startswith(b"SpoolError: ")
        assert b"open a new spool" in outcome
        assert opened.append_now(records(1)[0]) is not None, "the parent still writes directly"
        loop.run_until_complete(opened.close())
    finally:
        loop.close()


# --------------------------------------------------------------------------------------------
# Synchronous append at exit


def test_append_sync_works_after_the_loop_is_gone(tmp_path: Path) -> None:
    """append_sync stores records pending without an event loop; a later spool claims them."""
    opened = asyncio.run(open_spool(tmp_path))
    result = opened.append_sync(records(3))
    assert (len(result.ids), result.failed) == (3, 0)

    async def claim_all() -> ClaimResult:
        later = await open_spool(tmp_path)
        try:
            return await later.claim(10)
        finally:
            await later.close()

    claim = asyncio.run(claim_all())
    assert dict(claim.records) == dict(zip(result.ids, [body(0), body(1), body(2)], strict=True))
    asyncio.run(opened.close())


# --------------------------------------------------------------------------------------------
# Durability modes


async def test_always_mode_round_trip(tmp_path: Path) -> None:
    """Durability "always" stores, claims and acks like "spill"."""
    opened = await open_spool(tmp_path, durability="always")
    try:
        assert opened.durability == "always"
        await opened.append(records(3))
        claim = await opened.claim(10)
        await opened.ack(ids_of(claim))
        assert len(claim.records) == 3
        assert (await opened.status()).records == 0
    finally:
        await opened.close()


async def test_cancelled_open_leaves_no_thread_behind(tmp_path: Path) -> None:
    """Cancelling open_spool stops its thread (checked by the autouse fixture)."""
    task = asyncio.ensure_future(open_spool(tmp_path))
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_concurrent_appends_all_land(spool: Spool) -> None:
    """Many concurrent appends (committed in groups) all get distinct ids and are stored."""
    results = await asyncio.gather(*(spool.append(records(3, start=3 * n)) for n in range(50)))
    ids = [i for result in results for i in result.ids]
    assert len(set(ids)) == 150
    assert (await spool.status()).records == 150


def test_unclosed_spool_warns_and_closes_its_owner(tmp_path: Path) -> None:
    """A spool collected without close() emits ResourceWarning and marks its owner closed."""

    async def leak() -> None:
        opened = await open_spool(tmp_path)
        await opened.append(records(2), claimed=True)

    async def leak_and_collect() -> None:
        await leak()
        gc.collect()

    loop = asyncio.new_event_loop()
    try:
        with pytest.warns(ResourceWarning, match="never closed"):
            loop.run_until_complete(leak_and_collect())

        async def adopt() -> ClaimResult:
            other = await open_spool(tmp_path)
            try:
                # The leaked spool's thread marks it closed; wait for it by polling status.
                for _ in range(500):
                    status = await other.status()
                    if all(o.closed or o.owner_id == other.owner_id for o in status.owners):
                        break
                    await asyncio.sleep(0.01)
                return await other.claim(10)
            finally:
                await other.close()

        assert loop.run_until_complete(adopt()).adopted == 2
    finally:
        loop.close()


# --------------------------------------------------------------------------------------------
# Model-based: the spool against an in-memory model


class SpoolModel(RuleBasedStateMachine):
    """Random appends, claims, acks, releases, closes and crashes against a plain dict.

    The model knows every stored record (id -> (received_at, body)), which ones the current
    owner holds, and which ones a closed or crashed owner left behind (to be adopted).
    """

    LEASE = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.stored: dict[int, tuple[float, bytes]] = {}
        self.mine: set[int] = set()
        self.orphans: set[int] = set()
        self.serial = 0
        self.spool = self.run(self.open())

    async def open(self) -> Spool:
        return await open_spool(self.tmp.name, lease=self.LEASE, clock=self.clock)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.spool.close())
        finally:
            self.loop.close()
            self.tmp.cleanup()

    def new_records(self, ages: list[int], dup: bool) -> list[SpoolRecord]:
        out = []
        for age in ages:
            self.serial += 1
            # Duplicate bodies are allowed: the spool stores a multiset.
            data = body(0) if dup else body(self.serial)
            out.append(SpoolRecord(self.clock.now - age, data))
        return out

    @rule(
        ages=st.lists(st.integers(0, 1000), min_size=1, max_size=6),
        claimed=st.booleans(),
        dup=st.booleans(),
    )
    def append(self, ages: list[int], claimed: bool, dup: bool) -> None:
        given = self.new_records(ages, dup)
        result = self.run(self.spool.append(given, claimed=claimed))
        assert (len(result.ids), result.failed, result.evicted) == (len(given), 0, 0)
        for record_id, record in zip(result.ids, given, strict=True):
            assert record_id not in self.stored
            self.stored[record_id] = (record.received_at, record.body)
        if claimed:
            self.mine.update(result.ids)

    @rule(ages=st.lists(st.integers(0, 1000), min_size=1, max_size=3))
    def append_sync(self, ages: list[int]) -> None:
        given = self.new_records(ages, dup=False)
        result = self.spool.append_sync(given)
        for record_id, record in zip(result.ids, given, strict=True):
            self.stored[record_id] = (record.received_at, record.body)

    @rule(limit=st.integers(1, 8))
    def claim(self, limit: int) -> None:
        pending = sorted(
            (i for i in self.stored if i not in self.mine),
            key=lambda i: (self.stored[i][0], i),
        )
        expected = pending[:limit]
        result = self.run(self.spool.claim(limit))
        assert ids_of(result) == expected
        assert bodies_of(result) == [self.stored[i][1] for i in expected]
        assert result.expired == 0
        assert result.adopted == len(self.orphans & set(expected))
        self.orphans -= set(expected)
        self.mine.update(expected)

    @precondition(lambda self: self.mine)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.mine)), unique=True, min_size=1))
        self.run(self.spool.ack(chosen))
        for record_id in chosen:
            self.mine.discard(record_id)
            del self.stored[record_id]

    @precondition(lambda self: self.mine)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.mine)), unique=True, min_size=1))
        self.run(self.spool.release(chosen))
        self.mine.difference_update(chosen)

    @rule()
    def close_and_reopen(self) -> None:
        self.run(self.spool.close())
        self.orphans |= self.mine
        self.mine = set()
        self.spool = self.run(self.open())

    @rule()
    def crash_and_reopen(self) -> None:
        self.run(self.spool._crash())
        self.clock.now += self.LEASE + 1  # the dead owner's lease runs out
        self.orphans |= self.mine
        self.mine = set()
        self.spool = self.run(self.open())

    @invariant()
    def status_matches_model(self) -> None:
        status = self.run(self.spool.status())
        assert status.records == len(self.stored)
        assert status.bytes == sum(len(data) for _, data in self.stored.values())
        mine = [o for o in status.owners if o.owner_id == self.spool.owner_id]
        assert [o.claimed for o in mine] == [len(self.mine)]

    @rule()
    def everything_pending_is_claimable(self) -> None:
        result = self.run(self.spool.claim(10**6))
        pending = Counter(data for i, (_, data) in self.stored.items() if i not in self.mine)
        assert Counter(bodies_of(result)) == pending
        self.run(self.spool.release(ids_of(result)))
        # Released records are pending again (adoption markers are cleared by the claim).
        self.orphans -= set(ids_of(result))


SpoolModel.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSpoolModel = SpoolModel.TestCase


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Every spool thread a test starts has stopped by its end (closed or crashed)."""
    yield
    for _ in range(200):
        left = [t for t in threading.enumerate() if t.name.startswith("telemetrydeck-spool-")]
        if not left:
            return
        time.sleep(0.01)
    raise AssertionError(f"spool threads still running: {left}")
