"""A damaged spool: every row whose checksum still matches is kept and delivered.

Real files damaged on purpose (cut short, overwritten, replaced, emptied, their WAL deleted
after ``kill -9``), a real emulator, and a property test over random damage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetrydeck_async import TelemetryClient
from telemetrydeck_async._spool import Destination, SpoolRecord, _salvage, open_spool
from telemetrydeck_async.devserver import IngestEmulator
from tests import _proc
from tests.helpers import SHORT_DEADLINE, free_port, spool_client, start_producer, wait_until

LOGGER = "telemetrydeck_async"
PAGE = 4096
DB = "spool.sqlite3"


def problems(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def stored_bodies(db: Path) -> list[bytes]:
    """The bodies in a database file, read by SQLite itself (the file alone, no WAL)."""
    uri = f"file:{db}?immutable=1"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        return [row[0] for row in conn.execute("SELECT body FROM records ORDER BY id")]


def readable_bodies(db: Path) -> list[bytes]:
    """`stored_bodies`, or none while the file is still empty or mid-checkpoint."""
    try:
        return stored_bodies(db)
    except sqlite3.DatabaseError:  # no table in the file yet, or a page caught mid-copy
        return []


def intact(data: bytes, bodies: list[bytes], damaged: list[tuple[int, int]]) -> set[bytes]:
    """The bodies whose row no damaged byte touched.

    A row needs its own bytes (the cell header and columns just before the body, the body,
    the destination after it) and its page's header and cell pointer array.
    """
    whole = set()
    for body in bodies:
        at = data.find(body)
        assert at >= 0, "every body sits in the file in one piece (no overflow pages)"
        page = at // PAGE * PAGE
        needed = [(page, page + 8 + 2 * 100), (at - 48, at + len(body) + 16)]
        if not any(lo < end and start < hi for lo, hi in needed for start, end in damaged):
            whole.add(body)
    return whole


def aside_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{DB}.corrupt-*"))


def remove_wal(db: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def overwrite(path: Path, ranges: list[tuple[int, int]], seed: int) -> None:
    rng = random.Random(seed)
    with path.open("r+b") as f:
        for start, end in ranges:
            f.seek(start)
            f.write(rng.randbytes(end - start))


# --------------------------------------------------------------------------------------------
# The property: random byte ranges overwritten, every intact row recovered


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[bytes]]:
    """A closed spool file of 400 records (all in the main file), and their bodies."""
    directory = tmp_path_factory.mktemp("template")

    async def fill() -> None:
        spool = await open_spool(directory, destination=Destination("http://x/v2/", "app"))
        await spool.append(
            [
                SpoolRecord(1_800_000_000.0 + i, b'{"i":%d,"pad":"%s"}' % (i, b"p" * 120))
                for i in range(400)
            ]
        )
        await spool.close()

    asyncio.run(fill())
    db = directory / DB
    assert not Path(f"{db}-wal").exists()
    return db.read_bytes(), stored_bodies(db)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    damage=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 3 * PAGE)),
        min_size=1,
        max_size=3,
    ),
    seed=st.integers(0, 2**32),
)
def test_every_intact_row_is_recovered_from_random_damage(
    template: tuple[bytes, list[bytes]],
    tmp_path_factory: pytest.TempPathFactory,
    damage: list[tuple[float, int]],
    seed: int,
) -> None:
    """Random byte ranges overwritten: every untouched row comes back, nothing false does."""
    data, bodies = template
    ranges = [
        (int(where * len(data)), min(len(data), int(where * len(data)) + n)) for where, n in damage
    ]
    path = tmp_path_factory.mktemp("damaged") / DB
    path.write_bytes(data)
    overwrite(path, ranges, seed)
    found = _salvage(path)
    recovered = [record.body for record, _ in found]
    assert len(recovered) == len(set(recovered)), "no row twice"
    assert set(recovered) <= set(bodies), "nothing that was not stored"
    assert intact(data, bodies, ranges) <= set(recovered)
    for _, destination in found:
        assert destination in (None, Destination("http://x/v2/", "app"))


# --------------------------------------------------------------------------------------------
# Through the client: the damaged file moved aside, the intact rows and new signals delivered


APP = "damage-app"


async def spool_signals(spool_dir: Path, port: int, count: int) -> None:
    """``count`` signals spooled by a client whose endpoint is down; all in the main file."""
    td = spool_client(f"http://127.0.0.1:{port}", spool_dir, APP, retry=SHORT_DEADLINE)
    for i in range(count):
        await td.signal("Damage.case", payload={"Test.id": i})
    await td.aclose(timeout=5)
    assert td.stats.spooled == count


def cut(db: Path) -> list[tuple[int, int]]:
    size = db.stat().st_size
    at = size // 2 // PAGE * PAGE
    os.truncate(db, at)
    return [(at, size)]


def scribble(db: Path) -> list[tuple[int, int]]:
    pages = db.stat().st_size // PAGE
    ranges = [(page * PAGE, (page + 3) * PAGE) for page in (pages // 3,)]
    ranges.append((pages * PAGE * 2 // 3 + 1000, pages * PAGE * 2 // 3 + 3000))
    overwrite(db, ranges, 7)
    return ranges


def text(db: Path) -> list[tuple[int, int]]:
    size = db.stat().st_size
    db.write_text("these are not the bytes of a database\n" * 100)
    return [(0, size)]


def empty(db: Path) -> list[tuple[int, int]]:
    size = db.stat().st_size
    db.write_bytes(b"")
    return [(0, size)]


async def deliver_after(
    spool_dir: Path, port: int, expected: set[int], caplog: pytest.LogCaptureFixture
) -> tuple[IngestEmulator, TelemetryClient]:
    """Start a client with the endpoint up; wait (bounded) for ``expected`` and 5 new ids."""
    emulator = IngestEmulator(port=port)
    await emulator.start()
    td = spool_client(emulator.base_url, spool_dir, APP)
    await td.start()
    for i in range(10_000, 10_005):
        await td.signal("Damage.new", payload={"Test.id": i})
    want = expected | set(range(10_000, 10_005))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline and not want <= emulator.distinct_ids():
        await emulator.wait_for_signals(len(emulator.signals) + 1, timeout=0.2)
    await td.aclose(timeout=10)
    await emulator.stop()
    return emulator, td


def ids_of(bodies: set[bytes]) -> set[int]:
    return {json.loads(b)["payload"]["Test.id"] for b in bodies}


@pytest.mark.parametrize("damage", [cut, scribble, text, empty], ids=lambda f: f.__name__)
async def test_damaged_file_is_moved_aside_and_intact_rows_delivered(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], list[tuple[int, int]]],
) -> None:
    """The client starts, logs one ERROR naming both files, delivers intact rows and new ones."""
    port = free_port()
    await spool_signals(tmp_path, port, 600)
    db = tmp_path / DB
    data, bodies = db.read_bytes(), stored_bodies(db)
    expected = ids_of(intact(data, bodies, damage(db)))
    caplog.clear()
    emulator, td = await deliver_after(tmp_path, port, expected, caplog)
    delivered = emulator.distinct_ids()
    assert expected <= delivered
    assert set(range(10_000, 10_005)) <= delivered
    assert delivered <= set(range(600)) | set(range(10_000, 10_005))
    (aside,) = aside_files(tmp_path)
    (problem,) = problems(caplog)
    assert problem.levelno == logging.ERROR
    message = problem.getMessage()
    assert str(db) in message
    assert str(aside) in message
    assert f"keeping {len(delivered) - 5} record(s)" in message
    assert td.stats.recovered == len(delivered) - 5


async def test_deleted_wal_after_kill_9_keeps_what_reached_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9, then the WAL deleted: the file is consistent; all of it arrives, nothing moved."""
    port = free_port()
    child = await start_producer(port, tmp_path, "always", 3_000, 8, 10_000)
    try:
        await child.wait_for("^ok ", timeout=60)
        # The producer's worker checkpoints about once a second while idle: wait until the
        # file alone holds records (part in the file, maybe part still in the WAL), then kill.
        await wait_until(lambda: bool(readable_bodies(tmp_path / DB)), timeout=60)
        child.send_signal(signal.SIGKILL)
        await child.finish(timeout=30)
    finally:
        await child.kill()
    db = tmp_path / DB
    remove_wal(db)
    in_file = ids_of(set(stored_bodies(db)))
    assert in_file, "the producer's idle checkpoint put some records into the file"
    emulator = IngestEmulator(port=port)
    await emulator.start()
    try:
        td = spool_client(emulator.base_url, tmp_path, "crash-app")
        await td.start()
        await td.signal("Damage.new", payload={"Test.id": 10_000})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while loop.time() < deadline and not in_file | {10_000} <= emulator.distinct_ids():
            await emulator.wait_for_signals(len(emulator.signals) + 1, timeout=0.2)
        await td.aclose(timeout=10)
    finally:
        await emulator.stop()
    assert in_file | {10_000} <= emulator.distinct_ids()
    assert aside_files(tmp_path) == []
    assert problems(caplog) == []


async def test_directory_replaced_by_a_file_runs_from_memory(
    tmp_path: Path, emulator: IngestEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The spool directory became a file: one WARNING names it, new signals are delivered.

    A path that is already a file when the client is built is refused at construction (a
    configuration error, see test_messages.py); this is the directory replaced behind a
    configured client's back, before it starts.
    """
    spool_dir = tmp_path / "spool"
    await spool_signals(spool_dir, free_port(), 20)
    td = spool_client(emulator.base_url, spool_dir, APP)
    for child in spool_dir.iterdir():
        child.unlink()
    spool_dir.rmdir()
    spool_dir.write_text("a file where the spool directory was")
    caplog.clear()
    await td.start()
    await td.signal("Damage.new", payload={"Test.id": 1})
    await td.aclose(timeout=10)
    assert emulator.distinct_ids() == {1}
    (problem,) = problems(caplog)
    assert problem.levelno == logging.WARNING
    assert str(spool_dir) in problem.getMessage()
    assert "memory only" in problem.getMessage()
    assert spool_dir.read_text() == "a file where the spool directory was"


# --------------------------------------------------------------------------------------------
# What salvage reads besides the leaf pages of the main file


def test_salvage_reads_committed_records_from_the_wal(tmp_path: Path) -> None:
    """Killed before a checkpoint, then the file's header destroyed: the WAL's rows survive."""
    ids = kill_holder_with_wal(tmp_path)
    db = tmp_path / DB
    assert os.path.getsize(f"{db}-wal") > 0
    with db.open("r+b") as f:
        f.write(b"\xff" * 100)  # the file header: SQLite itself refuses the file now
    found = _salvage(db)
    assert sorted(record.body for record, _ in found) == sorted(
        b'{"hold":%d}' % i for i in range(len(ids))
    )


def kill_holder_with_wal(directory: Path) -> list[int]:
    """A worker appends 50 records and is SIGKILLed before its first checkpoint."""
    worker = Path(__file__).resolve().parents[1] / "scripts" / "spool_worker.py"
    proc = subprocess.Popen(
        [sys.executable, str(worker), "hold", str(directory), "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_proc.script_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert line, "the worker printed its ids"
    ids: list[int] = json.loads(line)["ids"]
    return ids


async def test_salvage_follows_overflow_pages(tmp_path: Path) -> None:
    """Bodies longer than a page live on overflow pages: kept whole, or not at all."""
    spool = await open_spool(tmp_path)
    big = [b'{"i":%d,"pad":"%s"}' % (i, bytes([97 + i]) * 10_000) for i in range(6)]
    await spool.append([SpoolRecord(1_800_000_000.0 + i, b) for i, b in enumerate(big)])
    await spool.close()
    db = tmp_path / DB
    data = db.read_bytes()
    # Damage the fourth body on one of its overflow pages (a run of 3,000 of its bytes can
    # only be there: its part on the leaf page is shorter), nothing else.
    at = data.find(bytes([97 + 3]) * 3_000)
    assert at > 0
    overwrite(db, [(at, at + 100)], 3)
    kept = [record.body for record, _ in _salvage(db)]
    assert kept == [b for i, b in enumerate(big) if i != 3]
