"""What the tests share besides fixtures (those are in conftest.py): retry policies, the
independent derivations of what a signal carries, the books check, client factories, helpers
for the command line, spool producer processes and a threaded emulator.

Only the standard library and the package are imported here: the core tests import
this module when CI runs them against the installed wheel with nothing else installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import platform
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from telemetrydeck_async import RetryPolicy, Stats, TelemetryClient, __version__
from telemetrydeck_async.devserver import IngestEmulator
from tests import _proc

#: A retry policy with short waits, so fault tests take milliseconds instead of seconds.
FAST_RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, deadline=5.0)

#: Gives up after 0.3 s: with a spool, failed batches reach the disk almost at once.
SHORT_DEADLINE = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, deadline=0.3)

ClientFactory = Callable[..., TelemetryClient]


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


def balanced(stats: Stats) -> bool:
    """The ledger's invariant: every accepted signal is in exactly one bucket."""
    return stats.enqueued == stats.sent + stats.spooled + stats.dropped_total + stats.pending


def free_port() -> int:
    """A loopback port nobody listens on right now (an endpoint that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def spool_client(
    base_url: str, spool_dir: Path, app_id: str = "spool-app", **options: object
) -> TelemetryClient:
    """A client with a spool and fast timings, aimed at ``base_url``."""
    settings: dict[str, object] = {
        "namespace": "com.example",
        "default_user": "spool-user",
        "retry": FAST_RETRY,
        "flush_interval": 0.05,
        "spool_dir": str(spool_dir),
    }
    settings.update(options)
    return TelemetryClient(app_id, base_url=base_url, **settings)  # type: ignore[arg-type]


async def run_cli(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run ``python -m telemetrydeck_async ARGS`` and return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "telemetrydeck_async",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def start_producer(
    port: int,
    spool_dir: Path,
    durability: str,
    count: int,
    workers: int,
    queue: int,
    pace: float = 0.0,
) -> _proc.Proc:
    """Start ``tests/scripts/spool_producer.py`` (app "crash-app") against a port on loopback."""
    return await _proc.start(
        str(_proc.SCRIPTS / "spool_producer.py"),
        f"http://127.0.0.1:{port}",
        str(spool_dir),
        durability,
        str(count),
        str(workers),
        str(queue),
        str(pace),
    )


class ThreadedEmulator:
    """An :class:`IngestEmulator` on its own loop in a thread, for synchronous tests.

    A test that blocks (a ``SyncTelemetryClient`` flushing, a subprocess waited for) cannot
    share its loop with the server it waits on; this one runs beside it.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.emu = IngestEmulator(host="127.0.0.1", port=0)
        self.call(self.emu.start())

    def call(self, coro: Any) -> Any:
        """Run ``coro`` on the emulator's loop and return its result (bounded)."""
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


async def wait_until(condition: Callable[[], bool], timeout: float = 90) -> bool:
    """Poll ``condition`` every 20 ms for at most ``timeout`` seconds; whether it came true.

    The bound is generous on purpose: it only stops a broken test from hanging, it never
    judges speed (the caller asserts the condition, not the time).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True
