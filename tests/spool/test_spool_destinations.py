"""One spool directory shared by two apps: each signal goes to its own namespace, never another.

Real clients on one ``spool_dir``, a real emulator (it records the namespace of each request
path), the real CLI in subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
import zlib
from pathlib import Path

from telemetrydeck_async import TelemetryClient
from telemetrydeck_async._spool import Destination, DestinationInfo, open_spool
from telemetrydeck_async.devserver import IngestEmulator
from tests.helpers import SHORT_DEADLINE, free_port, run_cli, spool_client

APPS = {"app-a": ("ns-a", range(50)), "app-b": ("ns-b", range(1000, 1050))}


def client(app: str, base_url: str, spool_dir: Path, **options: object) -> TelemetryClient:
    namespace, _ = APPS[app]
    return spool_client(base_url, spool_dir, app, namespace=namespace, **options)


async def spool_both(spool_dir: Path, port: int) -> None:
    """Each app spools its 50 signals while the endpoint is down."""
    for app, (_, ids) in APPS.items():
        td = client(app, f"http://127.0.0.1:{port}", spool_dir, retry=SHORT_DEADLINE)
        for i in ids:
            await td.signal("Shared.case", payload={"Test.id": i})
        await td.aclose(timeout=5)
        assert td.stats.spooled == len(ids)


def arrivals(emulator: IngestEmulator) -> dict[int, tuple[str | None, str]]:
    """Each delivered id: the namespace of the request that carried it, and its appID."""
    seen: dict[int, tuple[str | None, str]] = {}
    for batch, namespace in zip(emulator.batches, emulator.namespaces, strict=True):
        for signal in batch:
            seen[signal["payload"]["Test.id"]] = (namespace, signal["appID"])
    return seen


def assert_each_at_its_own(emulator: IngestEmulator) -> None:
    seen = arrivals(emulator)
    for app, (namespace, ids) in APPS.items():
        assert {i: seen.get(i) for i in ids} == dict.fromkeys(ids, (namespace, app))
    assert emulator.duplicates() == 0


async def wait_for_ids(emulator: IngestEmulator, ids: set[int], timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and not ids <= emulator.distinct_ids():
        await emulator.wait_for_signals(len(emulator.signals) + 1, timeout=0.2)
    assert ids <= emulator.distinct_ids()


async def test_each_app_alone_sends_only_its_own(tmp_path: Path) -> None:
    """App A running alone sends A's signals to ns-a and leaves B's; then B sends B's to ns-b."""
    port = free_port()
    await spool_both(tmp_path, port)
    async with IngestEmulator(port=port) as emulator:
        for app, (_, ids) in APPS.items():
            td = client(app, emulator.base_url, tmp_path)
            await td.start()
            await wait_for_ids(emulator, set(ids))
            # Several more recovery rounds: nothing of the other app may follow.
            await asyncio.sleep(0.5)
            await td.aclose(timeout=10)
            others = {i for other, (_, o) in APPS.items() if other != app for i in o}
            if app == "app-a":
                assert not others & emulator.distinct_ids()
            assert td.stats.recovered == len(ids)
    assert_each_at_its_own(emulator)


async def test_both_apps_at_once_each_send_their_own(tmp_path: Path) -> None:
    """Both apps running together on the spool: every signal at its own namespace, once."""
    port = free_port()
    await spool_both(tmp_path, port)
    async with IngestEmulator(port=port) as emulator:
        clients = [client(app, emulator.base_url, tmp_path) for app in APPS]
        await asyncio.gather(*(td.start() for td in clients))
        await wait_for_ids(emulator, {i for _, ids in APPS.values() for i in ids})
        await asyncio.sleep(0.3)
        await asyncio.gather(*(td.aclose(timeout=10) for td in clients))
    assert_each_at_its_own(emulator)
    assert [td.stats.recovered for td in clients] == [50, 50]


async def test_status_lists_each_destination(tmp_path: Path) -> None:
    """spool status shows how many signals each destination has waiting."""
    port = free_port()
    await spool_both(tmp_path, port)
    code, out, err = await run_cli("spool", "status", str(tmp_path))
    assert code == 0, err
    for app, (namespace, _) in APPS.items():
        url = f"http://127.0.0.1:{port}/v2/namespace/{namespace}/"
        assert re.search(rf"to {re.escape(url)} app {app}: 50 record\(s\)", out), out
    assert re.search(r"destinations\s+2$", out, re.MULTILINE)


async def test_drain_sends_each_signal_to_its_own_destination(tmp_path: Path) -> None:
    """spool drain without --app-id sends every destination's signals there, and exits 0."""
    port = free_port()
    await spool_both(tmp_path, port)
    async with IngestEmulator(port=port) as emulator:
        code, out, err = await run_cli("spool", "drain", str(tmp_path), "--timeout", "60")
    assert code == 0, err
    assert "sent 100 signal(s)" in out
    assert_each_at_its_own(emulator)


async def test_drain_for_one_app_refuses_the_other_apps_signals(tmp_path: Path) -> None:
    """spool drain --app-id A sends A's, refuses B's with a clear message, and exits 1."""
    port = free_port()
    await spool_both(tmp_path, port)
    async with IngestEmulator(port=port) as emulator:
        code, out, err = await run_cli(
            "spool",
            "drain",
            str(tmp_path),
            "--app-id",
            "app-a",
            "--namespace",
            "ns-a",
            "--base-url",
            emulator.base_url,
            "--timeout",
            "60",
        )
    assert code == 1
    assert "sent 50 signal(s)" in out
    assert "50 signal(s) belong to other destinations" in err
    assert f"{emulator.base_url}/v2/namespace/ns-b/ app app-b" in err
    assert emulator.distinct_ids() == set(APPS["app-a"][1])
    assert set(emulator.namespaces) == {"ns-a"}
    spool = await open_spool(tmp_path)
    try:
        status = await spool.status(by_destination=True)
    finally:
        await spool.close()
    url = f"{emulator.base_url}/v2/namespace/ns-b/"
    assert [(i.destination, i.records) for i in status.destinations] == [
        (Destination(url, "app-b"), 50)
    ]


# --------------------------------------------------------------------------------------------
# Files from before destinations (schema 1)

_SCHEMA_1 = (
    """CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL,
        size INTEGER NOT NULL, crc INTEGER NOT NULL, owner TEXT,
        adopted INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL)""",
    "CREATE INDEX records_by_age ON records (received_at, id)",
    """CREATE TABLE owners (owner TEXT PRIMARY KEY, pid INTEGER NOT NULL,
        hostname TEXT NOT NULL, lease REAL NOT NULL, started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL, closed INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID""",
    """CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0), records INTEGER NOT NULL,
        bytes INTEGER NOT NULL)""",
    "INSERT INTO totals VALUES (0, 0, 0)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "PRAGMA user_version = 1",
)


def write_schema_1(directory: Path, bodies: list[bytes]) -> None:
    """A spool file as the previous version wrote it, holding ``bodies``."""
    directory.mkdir(mode=0o700, exist_ok=True)
    with contextlib.closing(sqlite3.connect(directory / "spool.sqlite3")) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in _SCHEMA_1:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO records (received_at, size, crc, body) VALUES (?, ?, ?, ?)",
            [(time.time(), len(b), zlib.crc32(b), b) for b in bodies],
        )
        conn.commit()


async def test_records_from_schema_1_go_to_the_first_destination_that_opens(
    tmp_path: Path,
) -> None:
    """An old file is migrated; its records are claimed by the first app that opens it only."""
    bodies = [b'{"old":%d}' % i for i in range(3)]
    write_schema_1(tmp_path, bodies)
    first = await open_spool(tmp_path, destination=Destination("http://h/v2/", "a"))
    second = await open_spool(tmp_path, destination=Destination("http://h/v2/", "b"))
    try:
        assert (await second.claim(10)).records == ()
        claim = await first.claim(10)
        assert [body for _, body in claim.records] == bodies
        status = await first.status(by_destination=True)
        assert status.destinations == (
            DestinationInfo(Destination("http://h/v2/", "a"), 3, sum(map(len, bodies))),
        )
    finally:
        await first.close()
        await second.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.sqlite3")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (4,)


async def test_drain_refuses_records_without_a_destination_unless_told_where(
    tmp_path: Path,
) -> None:
    """Records from schema 1 have no destination: drain without --app-id sends nothing."""
    body = json.dumps({"appID": "app-a", "type": "Old.signal", "clientUser": "x"}).encode()
    write_schema_1(tmp_path, [body])
    code, _out, err = await run_cli("spool", "drain", str(tmp_path), "--timeout", "5")
    assert code == 1
    assert "1 signal(s)" in err
    assert "no destination" in err
    assert "nothing was sent" in err


async def test_drain_exits_nonzero_when_it_cannot_read_the_spool(tmp_path: Path) -> None:
    """A spool this version cannot read: drain says so and exits 1 (never "0 left")."""
    with contextlib.closing(sqlite3.connect(tmp_path / "spool.sqlite3")) as conn:
        conn.execute("PRAGMA user_version = 99")
    code, out, err = await run_cli(
        "spool", "drain", str(tmp_path), "--app-id", "app-a", "--timeout", "5"
    )
    assert code == 1
    assert "cannot be read" in err
    assert "0 left" not in out
