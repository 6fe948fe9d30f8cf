"""Shared fixtures: a real ingest emulator on 127.0.0.1:0 and clients pointed at it.

Every test is also an accounting test: each client it creates (any subclass too) must balance
its books when the test ends (``tracked_clients``), and ``books_watch`` checks them at every
turn of the event loop while a test runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from telemetrydeck_async import Stats, TelemetryClient, _lifecycle
from telemetrydeck_async.devserver import IngestEmulator
from tests import _proc
from tests.helpers import FAST_RETRY, ClientFactory, ThreadedEmulator, balanced


@pytest.fixture(autouse=True)
def _isolated_user_data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default-user files go to a temporary data dir, never the real home (also for the CLI)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
    monkeypatch.delenv("TELEMETRYDECK_DISABLED", raising=False)


@pytest.fixture(autouse=True)
def tracked_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[TelemetryClient]]:
    """Every client the test creates balances its books once the test is over.

    Clients are caught where each one registers with the lifecycle hooks (its ``__init__``
    calls ``_lifecycle.track``), so clients built by helpers and subclasses count too. They
    are held strongly until the check, so a client dropped mid-test is checked as well.
    """
    created: list[TelemetryClient] = []
    track = _lifecycle.track

    def track_and_keep(client: TelemetryClient, *fork_hook: Any) -> None:
        created.append(client)
        track(client, *fork_hook)

    monkeypatch.setattr(_lifecycle, "track", track_and_keep)
    yield created
    unbalanced = [(client, client.stats) for client in created]
    unbalanced = [(client, stats) for client, stats in unbalanced if not balanced(stats)]
    assert not unbalanced, f"the books do not balance: {unbalanced}"


@pytest.fixture
async def books_watch(tracked_clients: list[TelemetryClient]) -> AsyncIterator[list[Stats]]:
    """Check every client's books at each turn of the event loop while the test runs.

    A task that yields with ``sleep(0)`` runs once per loop iteration, between any two steps
    of the other tasks: every ``await`` that gives up the loop is a point where the books are
    read. Yields the unbalanced snapshots seen (the teardown asserts there are none).
    """
    seen: list[Stats] = []
    samples = 0

    async def sample() -> None:
        nonlocal samples
        while True:
            for client in tracked_clients:
                stats = client.stats
                if not balanced(stats):
                    seen.append(stats)
            samples += 1
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(sample())
    yield seen
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert samples > 0
    assert not seen, f"unbalanced books at {len(seen)} of {samples} samples, first: {seen[0]}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``TELEMETRYDECK_WATCH_BOOKS=1``: every async test reads the books at every loop turn.

    Off by default: the watcher keeps the loop busy, which costs CPU in tests that wait.
    """
    if os.environ.get("TELEMETRYDECK_WATCH_BOOKS") != "1":
        return
    for item in items:
        names = getattr(item, "fixturenames", None)
        if item.get_closest_marker("asyncio") and names is not None and "books_watch" not in names:
            names.append("books_watch")  # the closure is computed at collection: extend it


@pytest.fixture
async def emulator() -> AsyncIterator[IngestEmulator]:
    """A running local ingest emulator on a free loopback port."""
    async with IngestEmulator(host="127.0.0.1", port=0) as emu:
        yield emu


@pytest.fixture
async def make_client(emulator: IngestEmulator) -> AsyncIterator[ClientFactory]:
    """Build clients aimed at the emulator with fast retries; every one is closed afterwards."""
    clients: list[TelemetryClient] = []

    def factory(**options: Any) -> TelemetryClient:
        options.setdefault("namespace", "com.example")
        options.setdefault("base_url", emulator.base_url)
        options.setdefault("default_user", "test-user")
        options.setdefault("retry", FAST_RETRY)
        options.setdefault("flush_interval", 60.0)
        client = TelemetryClient(options.pop("app_id", "test-app"), **options)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose(timeout=5)


@pytest.fixture
def threaded_emulator() -> Iterator[ThreadedEmulator]:
    """A running emulator on 127.0.0.1:0 served from its own thread."""
    server = ThreadedEmulator()
    yield server
    server.stop()


@pytest.fixture
async def procs() -> AsyncIterator[list[_proc.Proc]]:
    """Processes started by a test; any still running at the end is killed."""
    started: list[_proc.Proc] = []
    yield started
    for proc in started:
        await proc.kill()
