"""What every benchmark shares: the workload, the hand-written baseline, the sink, the probes.

The workload is the same everywhere: signal type ``Bench.Signal.sent``, four distinct users, a
3-key payload (an int that changes per call, a str, a bool). The baseline is what a careful
engineer would write by hand without this SDK: build the wire dict (SHA-256 of user + salt, an
ISO-8601 ``receivedAt``), ``list.append`` it, and POST 500 of them as one JSON array with a
reused aiohttp session, at most two requests in flight (the SDK's default concurrency).

The *same-bytes* baseline (issue 13) is the practical limit: it puts exactly the SDK's bytes on
the wire at the SDK's defaults (100 per request, two in flight), with what a careful engineer
would add by hand: the user hash cached per user, and the fastest JSON encoder available
(orjson), or the stdlib's.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import gc
import hashlib
import importlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

APP_ID = "BENCH-APP-0000"
NAMESPACE = "com.example.bench"
SALT = "bench-salt"
SESSION_ID = "5b0c4b8e-6f5d-4a53-9d1e-2f1f0f0a7c11"
SIGNAL_TYPE = "Bench.Signal.sent"
USERS = ("user-1", "user-2", "user-3", "user-4")
BASELINE_BATCH = 500
BASELINE_CONCURRENCY = 2
_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


def _sdk_parameters() -> dict[str, Any]:
    """The ``TelemetryDeck.*`` keys the client adds to every payload, if this version has any.

    The baseline sends them too, so both sides put the same bytes on the wire.
    """
    try:
        module = importlib.import_module("telemetrydeck_async._parameters")
    except ImportError:
        return {}
    return dict(module.sdk_parameters())


#: What the client adds to each payload; the baseline merges the same keys by hand.
SDK_PARAMETERS: dict[str, Any] = _sdk_parameters()


def payload(i: int) -> dict[str, Any]:
    """The 3-key payload of signal ``i``."""
    return {"Bench.index": i, "Bench.plan": "pro", "Bench.flag": True}


def wire_dict(i: int) -> dict[str, Any]:
    """The baseline's signal: the full wire object, built the obvious way, every call."""
    user = USERS[i & 3]
    return {
        "appID": APP_ID,
        "clientUser": hashlib.sha256((user + SALT).encode()).hexdigest(),
        "sessionID": SESSION_ID,
        "type": SIGNAL_TYPE,
        "isTestMode": False,
        "receivedAt": dt.datetime.now(dt.timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "payload": {**SDK_PARAMETERS, "Bench.index": i, "Bench.plan": "pro", "Bench.flag": True},
    }


def encode_batch(items: Sequence[dict[str, Any]]) -> bytes:
    """The baseline's request body: one ``json.dumps`` of the whole list."""
    return json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode()


try:
    from orjson import dumps as _orjson_dumps
except ImportError:  # the `fast`/`bench` extra is not installed: only the stdlib baseline runs
    _orjson_dumps = None

#: Encoders of a request body by name; "orjson" only when it is installed.
ENCODERS: dict[str, Any] = {"stdlib": encode_batch}
if _orjson_dumps is not None:
    ENCODERS["orjson"] = _orjson_dumps

_hashes: dict[str, str] = {}


def cached_hash(user: str) -> str:
    """SHA-256 of user + salt, computed once per user (what a careful integration does)."""
    digest = _hashes.get(user)
    if digest is None:
        digest = _hashes[user] = hashlib.sha256((user + SALT).encode()).hexdigest()
    return digest


def same_bytes_dict(i: int) -> dict[str, Any]:
    """The same-bytes baseline's signal: the SDK's wire object, with the user hash cached."""
    return {
        "appID": APP_ID,
        "clientUser": cached_hash(USERS[i & 3]),
        "sessionID": SESSION_ID,
        "type": SIGNAL_TYPE,
        "isTestMode": False,
        "receivedAt": dt.datetime.now(dt.timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "payload": {**SDK_PARAMETERS, "Bench.index": i, "Bench.plan": "pro", "Bench.flag": True},
    }


# ----------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    """The median (nearest rank)."""
    return percentile(values, 50)


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    """One figure of the table: a value, the baseline measured in the same run, a target."""

    key: str
    figure: str
    value: float | None
    unit: str
    baseline: float | None = None
    target: str = "—"
    met: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """value / baseline, when both exist and the baseline is not zero."""
        if self.value is None or self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    def to_json(self) -> dict[str, Any]:
        """The row as plain JSON values."""
        return {
            "key": self.key,
            "figure": self.figure,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "note": self.note,
            **({"extra": self.extra} if self.extra else {}),
        }


def fmt(value: float | None, unit: str) -> str:
    """A value with its unit, rounded for a table."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit in ("µs", "ms"):
        return f"{value:.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "B":
        return f"{value:,.0f} B"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "":
        return f"{value:,.0f}"
    if unit == "instr":
        return f"{value:,.0f}"
    return f"{value:g} {unit}"


# ----------------------------------------------------------------------------- processes


def closed_loopback_port() -> int:
    """A loopback port that nothing listens on (bound, then released): connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def child_env() -> dict[str, str]:
    """The environment for helper processes: this checkout's package first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Sink:
    """The counting sink (``sink.py``) in its own process, on ``port`` (0: a free one)."""

    def __init__(self, port: int = 0) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self.port = port
        self._session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str:
        """The base URL to give the client (``http://`` is allowed for loopback)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ingest_url(self) -> str:
        """The namespaced ingest URL, as the client builds it."""
        return f"{self.base_url}/v2/namespace/{NAMESPACE}/"

    async def __aenter__(self) -> Sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "sink.py"),
            "--port",
            str(self.port),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=child_env(),
        )
        self._proc = proc
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line.startswith(b"PORT "):
            raise RuntimeError(f"the sink did not start: {line!r}")
        self.port = int(line.split()[1])
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
        proc = self._proc
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.close()  # the sink exits when its stdin closes
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()

    async def count(self, what: str = "signals") -> int:
        """Signals received so far (``"events"``: the peers' events)."""
        assert self._session is not None
        async with self._session.get(f"{self.base_url}/count") as response:
            data = await response.json()
        return int(data[what])


# ----------------------------------------------------------------------------- the baseline


class BaselineSender:
    """The hand-written integration: append wire dicts, POST every ``batch`` as one JSON array.

    The defaults are the first baseline (500 per request, a hash per call, ``json.dumps``);
    ``same_bytes=True`` with ``batch=100`` and an encoder from :data:`ENCODERS` is the
    same-bytes baseline.
    """

    def __init__(
        self,
        url: str,
        *,
        batch: int = BASELINE_BATCH,
        encoder: str = "stdlib",
        same_bytes: bool = False,
    ) -> None:
        self.url = url
        self.batch = batch
        self.encode = ENCODERS[encoder]
        self.build = same_bytes_dict if same_bytes else wire_dict
        self.buffer: list[dict[str, Any]] = []
        self._slots = asyncio.Semaphore(BASELINE_CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BaselineSender:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=BASELINE_CONCURRENCY), headers=_HEADERS
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, items: list[dict[str, Any]]) -> None:
        try:
            assert self._session is not None
            body = self.encode(items)
            async with self._session.post(self.url, data=body) as response:
                response.raise_for_status()
                await response.read()
        finally:
            self._slots.release()

    async def send_buffer(self) -> None:
        """Hand the buffered dicts to a POST (waits while two are in flight)."""
        if not self.buffer:
            return
        items, self.buffer = self.buffer, []
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._post(items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def produce(self, start: int, n: int, *, yield_every: int = 0) -> None:
        """Build and queue signals ``start .. start+n``, sending every full batch."""
        build = self.build
        batch = self.batch
        for i in range(start, start + n):
            self.buffer.append(build(i))
            if len(self.buffer) >= batch:
                await self.send_buffer()
            if yield_every and i % yield_every == 0:
                await asyncio.sleep(0)

    async def drain(self) -> None:
        """Send what is buffered and wait for every request to be answered."""
        await self.send_buffer()
        while self._tasks:
            await asyncio.gather(*list(self._tasks))


# ----------------------------------------------------------------------------- probes


class GcWatch:
    """Records every garbage collection (start, end, generation) through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((self._started, time.perf_counter(), int(info["generation"])))

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def durations_ms(self) -> list[float]:
        """Each pause in milliseconds."""
        return [(end - start) * 1000 for start, end, _ in self.pauses]


class LoopProbe:
    """Measures event-loop lag: sleeps ``interval`` again and again and records the oversleep.

    Beside the wall-clock oversleep it records the CPU time this process used meanwhile.
    ``min(oversleep, CPU used)`` is the part of the lag that work in this process can explain:
    when another process holds the core, the wall clock runs on but this process's CPU clock
    does not. On a busy shared machine that is the figure that says what the SDK did.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        # (start, end, lag in s, CPU seconds this process used from start to end)
        self.samples: list[tuple[float, float, float, float]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        clock = time.perf_counter
        cpu = time.process_time
        interval = self.interval
        record = self.samples.append
        while True:
            start = clock()
            cpu_start = cpu()
            await asyncio.sleep(interval)
            end = clock()
            record((start, end, end - start - interval, cpu() - cpu_start))

    def start(self) -> None:
        """Start probing in the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop probing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def lags_ms(
        self, gc_watch: GcWatch | None = None, *, own_work_only: bool = False
    ) -> tuple[list[float], list[float]]:
        """Lags in ms, split into (samples that overlapped no GC pause, those that did).

        ``own_work_only``: each lag capped by the CPU time the process used meanwhile.
        """
        pauses = sorted(gc_watch.pauses) if gc_watch is not None else []
        starts = [p[0] for p in pauses]
        clean: list[float] = []
        with_gc: list[float] = []
        for start, end, lag, used in self.samples:
            # Pauses never overlap one another, so only the last one that began before `end`
            # can have ended after `start`.
            k = bisect.bisect_left(starts, end)
            hit = k > 0 and pauses[k - 1][1] >= start
            value = min(lag, used) if own_work_only else lag
            (with_gc if hit else clean).append(value * 1000)
        return clean, with_gc


class LoopSlices:
    """Measures how long each turn of the event loop keeps it busy, timers left out.

    A loop turn runs every callback that became ready, then waits in ``select``. The time from
    one ``select`` returning to the next call of it is the longest any ready task can wait for
    work already running on the loop: the stall that code on the loop causes. A sleeping
    probe (:class:`LoopProbe`) adds to that how late the machine wakes the loop, which on a
    virtual machine can be most of its figure; the two side by side tell them apart.

    It wraps the running loop's selector for the measurement and puts it back afterwards.
    ``_selector`` is asyncio's private attribute; the benchmark may lean on it, the SDK does
    not. Beside each slice's wall time the loop thread's own CPU time is kept: a slice in which
    the thread waited for a core (another process, or the GIL held by another thread) shows
    less CPU than wall time.
    """

    def __init__(self) -> None:
        # (wall seconds, this thread's CPU seconds) per loop turn that ran anything
        self.slices: list[tuple[float, float]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._selector: Any = None

    def start(self) -> None:
        """Start measuring the running loop's turns."""
        loop = asyncio.get_running_loop()
        inner = loop._selector  # type: ignore[attr-defined]
        record = self.slices.append
        clock = time.perf_counter
        cpu = time.thread_time
        woke = [clock(), cpu()]

        class _Timed:
            def select(self, timeout: float | None = None) -> Any:
                now, used = clock(), cpu()
                record((now - woke[0], used - woke[1]))
                events = inner.select(timeout)
                woke[0], woke[1] = clock(), cpu()
                return events

            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

        self._loop, self._selector = loop, inner
        loop._selector = _Timed()  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Put the loop's own selector back."""
        if self._loop is not None:
            self._loop._selector = self._selector  # type: ignore[attr-defined]
            self._loop = None

    def busy_ms(self, *, own_cpu: bool = False) -> list[float]:
        """Each turn's busy time in ms (``own_cpu``: the loop thread's CPU time in it)."""
        return [(used if own_cpu else wall) * 1000 for wall, used in self.slices]


def turn_rows(key: str, label: str, turns: LoopSlices, base: LoopSlices | None) -> list[Row]:
    """The loop's busy turns (:class:`LoopSlices`): p99 and max, wall and the loop's CPU."""
    wall, own = turns.busy_ms(), turns.busy_ms(own_cpu=True)
    base_wall = base.busy_ms() if base is not None else []
    return [
        Row(
            f"{key}.turn_p99",
            f"loop busy per turn p99, {label} (what waits behind work on the loop)",
            percentile(wall, 99),
            "ms",
            percentile(base_wall, 99) if base is not None else None,
            "≤ 1 ms",
            met=percentile(wall, 99) <= 1.0,
            note=f"{len(wall)} turns; the loop thread's CPU time per turn: p99 "
            f"{percentile(own, 99):.3f} ms, max {max(own, default=0.0):.2f} ms; timer wake-up "
            "latency left out (the probe rows include it)",
        ),
        Row(
            f"{key}.turn_max",
            f"loop busy per turn max, {label}",
            max(wall, default=0.0),
            "ms",
            max(base_wall, default=0.0) if base is not None else None,
            "≤ 5 ms",
            met=max(wall, default=0.0) <= 5.0,
        ),
    ]


def machine() -> dict[str, Any]:
    """CPU model, cores, Python and OS, for the report."""
    import platform

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "aiohttp": aiohttp.__version__,
        # Other processes on the machine skew wall-clock figures; the load says how busy it was.
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
    }
