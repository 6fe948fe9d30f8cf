"""Shared fixtures: a real ingest emulator on 127.0.0.1:0 and clients pointed at it."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from telemetrydeck_async import RetryPolicy, TelemetryClient, __version__
from telemetrydeck_async.devserver import IngestEmulator

#: A retry policy with short waits, so fault tests take milliseconds instead of seconds.
FAST_RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, deadline=5.0)


def sha256_hex(text: str) -> str:
    """The hash the official SDKs send as clientUser, computed independently of the package."""
    return hashlib.sha256(text.encode()).hexdigest()


def sdk_parameters(**extra: str) -> dict[str, str]:
    """The TelemetryDeck parameters every signal's payload carries, derived independently."""
    system = {"Darwin": "macOS"}.get(platform.system(), platform.system())
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "aarch64": "arm64"}.get(machine, machine)
    return {
        "TelemetryDeck.SDK.name": "PythonAsyncSDK",
        "TelemetryDeck.SDK.version": __version__,
        "TelemetryDeck.SDK.nameAndVersion": f"PythonAsyncSDK {__version__}",
        "TelemetryDeck.SDK.pythonVersion": platform.python_version(),
        "TelemetryDeck.Device.operatingSystem": system,
        "TelemetryDeck.Device.architecture": machine,
        **extra,
    }


@pytest.fixture(autouse=True)
def _isolated_user_data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default-user files go to a temporary data dir, never the real home (also for the CLI)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
    monkeypatch.delenv("TELEMETRYDECK_DISABLED", raising=False)


@pytest.fixture
async def emulator() -> AsyncIterator[IngestEmulator]:
    """A running local ingest emulator on a free loopback port."""
    async with IngestEmulator(host="127.0.0.1", port=0) as emu:
        yield emu


ClientFactory = Callable[..., TelemetryClient]


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


class ThreadedEmulator:
    """An :class:`IngestEmulator` on its own loop in a thread, for synchronous tests.

    A test that blocks (a ``SyncTelemetryClient`` flushing, a subprocess waited for) cannot
    share its loop with the server it waits on; this one runs beside it.
    """

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.emu = IngestEmulator(host="127.0.0.1", port=0)
        self.call(self.emu.start())

    def call(self, coro: Any) -> Any:
        """Run ``coro`` on the emulator's loop and return its result (bounded)."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def wait_for_signals(self, n: int, timeout: float = 60.0) -> bool:
        """Wait until ``n`` signals were accepted; False after ``timeout`` s."""
        return bool(self.call(self.emu.wait_for_signals(n, timeout)))

    def stop(self) -> None:
        """Stop the server and its loop."""
        self.call(self.emu.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def threaded_emulator() -> Iterator[ThreadedEmulator]:
    """A running emulator on 127.0.0.1:0 served from its own thread."""
    server = ThreadedEmulator()
    yield server
    server.stop()
