"""The service figure: what the SDK costs a real web service, measured from outside.

A hello-world FastAPI app runs under uvicorn (one worker) in its own process; a load driver in
another process keeps ``CONNECTIONS`` keep-alive connections busy until ``requests`` requests
are answered. The handler does nothing else, so this is the worst case: every microsecond the
SDK adds is a large share of the request. Variants, each in a fresh server, taking turns in
every round (the order rotates from round to round):

* ``none``: no analytics;
* ``none-again``: the same app again, an A/A pair: its difference from ``none`` is what the
  machine's noise alone makes, the yardstick for the other differences;
* ``nowait``: the handler calls ``td.signal_nowait()`` (the client made by
  ``telemetry_lifespan``, sending to the loopback sink);
* ``middleware``: ``TelemetryMiddleware`` as in docs/integrations.md, the handler untouched;
* ``hand``: the same-bytes hand-written client in the handler (the practical limit, as in the
  other figures): it builds the wire object the SDK sends for ``nowait`` (user hash cached),
  appends it, and POSTs every 100 as one array (the fastest encoder, at most two in flight);
* ``posthog`` / ``segment``: the peers' capture call in the handler (the ``bench`` extra).

Per variant: requests/s, p99 latency (as the driver sees it) and the server's CPU time per
request (all its threads, read by the app itself before and after the load), each against
``none``; and how many of the signals reached the sink once the server stopped. Differences
are paired: each round's figure against the same round's ``none``, then the median of the
rounds, with the rounds' spread (half the range) beside it.

Usage of the helper processes (the figure starts them): ``python -m benchmarks.service serve
--variant V --sink URL`` prints ``PORT <n>`` and serves until its standard input closes;
``python -m benchmarks.service drive --port N --requests N`` prints one JSON line.

**Instructions** (``service-count``, when valgrind is installed): the same servers, run under
callgrind, which counts the instructions the server executes for ``COUNT_REQUESTS`` requests
after a warm-up; ``COUNT_ROUNDS`` fresh servers per variant, taking turns, and their median.
A count does not move with the machine's load, so it resolves what the CPU time cannot here:
the A/A pair differs by a fraction of a percent. Each variant's
count is given against ``none`` as a share of the no-SDK request; the issue's +10 µs on its
198 µs no-SDK request is +5.1 %.

``python -m benchmarks.service shares --variant middleware`` samples a loaded server with
py-spy (installed separately) and prints the share of its time per owner: the SDK's call,
the SDK's sending, the web stack. On a machine too busy for the CPU figure to resolve a few
µs per request, the share times the no-SDK CPU per request still says what the SDK costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ._common import (
    APP_ID,
    NAMESPACE,
    ROOT,
    SALT,
    SDK_PARAMETERS,
    SESSION_ID,
    USERS,
    BaselineSender,
    Row,
    Sink,
    cached_hash,
    child_env,
    median,
    percentile,
)
from .figures import FASTEST, Settings
from .peers import _installed

CONNECTIONS = 32
VARIANTS = ("none", "none-again", "hand", "nowait", "middleware", "posthog", "segment")
#: The variants with a target: this SDK's.
OURS = ("nowait", "middleware")
#: The variants whose signals the sink counts as this SDK's (by their wire format).
WIRE = (*OURS, "hand")
#: The variants that send something per request.
SIGNALLING = (*WIRE, "posthog", "segment")
#: The issue's target, +10 µs of server CPU on its 198 µs no-SDK request, as a share.
TARGET_SHARE = 10.0 / 198.0
REQUEST_SIGNAL = "Bench.Request.handled"

# ----------------------------------------------------------------------------- the server


def _app(variant: str, sink_url: str) -> Any:
    """The FastAPI app of one variant."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from telemetrydeck_async import TelemetryClient
    from telemetrydeck_async.starlette import TelemetryMiddleware, telemetry_lifespan

    def make_client() -> TelemetryClient:
        return TelemetryClient(
            APP_ID, namespace=NAMESPACE, base_url=sink_url, salt=SALT, session_id=SESSION_ID
        )

    peer: Any = None
    hand: BaselineSender | None = None
    if variant == "hand":
        hand = BaselineSender(sink_url + f"/v2/namespace/{NAMESPACE}/", batch=100,
                              encoder=FASTEST, same_bytes=True)  # fmt: skip
    elif variant == "posthog":
        from posthog.async_client import AsyncClient

        peer = AsyncClient("phc_bench", host=sink_url)
    elif variant == "segment":
        from segment.analytics import Client

        peer = Client(write_key="bench", host=sink_url)

    lifespan: Any = telemetry_lifespan(make_client) if variant in OURS else None
    if hand is not None:

        @contextlib.asynccontextmanager
        async def hand_lifespan(_app: Any) -> AsyncIterator[None]:
            async with hand:
                yield None
                await hand.drain()

        lifespan = hand_lifespan
    app = FastAPI(lifespan=lifespan)
    if variant == "middleware":
        app.add_middleware(TelemetryMiddleware)
    counter = iter(range(1 << 62))

    @app.get("/_cpu")
    async def cpu() -> JSONResponse:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return JSONResponse({"cpu": usage.ru_utime + usage.ru_stime})

    @app.get("/_close")
    async def close() -> JSONResponse:
        """Flush the peer's queue (the SDK variants flush at shutdown, in the lifespan)."""
        if hand is not None:
            await hand.drain()
        elif variant == "posthog":
            await peer.flush()
        elif variant == "segment":
            await asyncio.to_thread(peer.flush)
        return JSONResponse({"ok": True})

    if variant == "nowait":

        @app.get("/")
        async def hello_nowait() -> dict[str, str]:
            i = next(counter)
            app.state.telemetry.signal_nowait(
                REQUEST_SIGNAL, client_user=USERS[i & 3], payload={"Bench.route": "/"}
            )
            return {"hello": "world"}

    elif hand is not None:
        sender = hand
        user_hashes = [cached_hash(user) for user in USERS]
        route_payload = {**SDK_PARAMETERS, "Bench.route": "/"}

        @app.get("/")
        async def hello_hand() -> dict[str, str]:
            # What the SDK sends for the nowait variant, built by hand: the wire object with
            # the user hash cached and the SDK's payload keys, appended; every 100 are POSTed.
            i = next(counter)
            sender.buffer.append(
                {
                    "appID": APP_ID,
                    "clientUser": user_hashes[i & 3],
                    "sessionID": SESSION_ID,
                    "type": REQUEST_SIGNAL,
                    "isTestMode": False,
                    "receivedAt": dt.datetime.now(dt.timezone.utc)
                    .isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"),
                    "payload": route_payload,
                }
            )
            if len(sender.buffer) >= sender.batch:
                await sender.send_buffer()
            return {"hello": "world"}

    elif variant == "posthog":

        @app.get("/")
        async def hello_posthog() -> dict[str, str]:
            i = next(counter)
            peer.capture(REQUEST_SIGNAL, distinct_id=USERS[i & 3], properties={"route": "/"})
            return {"hello": "world"}

    elif variant == "segment":

        @app.get("/")
        async def hello_segment() -> dict[str, str]:
            i = next(counter)
            peer.track(user_id=USERS[i & 3], event=REQUEST_SIGNAL, properties={"route": "/"})
            return {"hello": "world"}

    else:

        @app.get("/")
        async def hello() -> dict[str, str]:
            return {"hello": "world"}

    return app


def serve(variant: str, sink_url: str) -> None:
    """Run uvicorn on a free loopback port until standard input closes."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        _app(variant, sink_url),
        log_level="warning",
        access_log=False,
        lifespan="on",
        backlog=1024,
    )
    server = uvicorn.Server(config)

    def watch_stdin() -> None:
        sys.stdin.buffer.read()  # returns when the parent closes the pipe (or dies)
        server.should_exit = True

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


# ----------------------------------------------------------------------------- the driver


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending GET / again and again, one request at a time."""

    def __init__(self, driver: _Driver) -> None:
        self.driver = driver
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.next()

    def next(self) -> None:
        if not self.driver.take():
            assert self.transport is not None
            self.transport.close()
            return
        self.started = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.driver.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        start = head.find(b"content-length:")
        length = int(head[start + 15 : head.find(b"\r\n", start)].strip()) if start >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        if not head.startswith(b"http/1.1 200"):
            self.driver.errors += 1
        self.buffer = self.buffer[end + 4 + length :]
        self.driver.latencies.append(time.perf_counter() - self.started)
        self.next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.driver.closed()


class _Driver:
    def __init__(self, port: int, requests: int, connections: int) -> None:
        self.port = port
        self.left = requests
        self.open = connections
        self.connections = connections
        self.errors = 0
        self.latencies: list[float] = []
        self.request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n\r\n"
        self.done = asyncio.get_running_loop().create_future()

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.done.done():
            self.done.set_result(None)

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for _ in range(self.connections):
            await loop.create_connection(lambda: _Connection(self), "127.0.0.1", self.port)
        await asyncio.wait_for(self.done, 600)
        elapsed = time.perf_counter() - t0
        lat = [x * 1000 for x in self.latencies]
        return {
            "answered": len(lat),
            "errors": self.errors,
            "elapsed": elapsed,
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
        }


def drive(port: int, requests: int, connections: int) -> None:
    """Send ``requests`` requests over ``connections`` connections; print the figures."""

    async def run() -> dict[str, Any]:
        return await _Driver(port, requests, connections).run()

    print(json.dumps(asyncio.run(run())), flush=True)


# ----------------------------------------------------------------------------- the figure


async def _get(port: int, path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    result: dict[str, Any] = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return result


async def _drive(port: int, requests: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.service",
        "drive",
        "--port",
        str(port),
        "--requests",
        str(requests),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=child_env(),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 900)
    if proc.returncode != 0:
        raise RuntimeError(f"the load driver failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


@contextlib.asynccontextmanager
async def _server(
    variant: str, sink: Sink, wrap: tuple[str, ...] = (), patience: float = 60.0
) -> AsyncIterator[tuple[int, int]]:
    """A fresh server of ``variant`` aimed at ``sink``: its (pid, port), stopped at the end.

    ``wrap``: a command to run the server under (valgrind), ``patience`` the seconds its
    start and its stop may take.
    """
    proc = await asyncio.create_subprocess_exec(
        *wrap,
        sys.executable,
        "-m",
        "benchmarks.service",
        "serve",
        "--variant",
        variant,
        "--sink",
        sink.base_url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=child_env(),
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), patience)
        if not line.startswith(b"PORT "):
            raise RuntimeError(f"the server did not start: {line!r}")
        port = int(line.split()[1])
        # The port is printed once bound; uvicorn listens a moment later (much later under
        # valgrind): wait until a connection is accepted.
        deadline = time.monotonic() + patience
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if time.monotonic() > deadline or proc.returncode is not None:
                    raise
                await asyncio.sleep(0.1)
            else:
                writer.close()
                break
        yield proc.pid, port
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # uvicorn shuts down: the lifespan closes (and flushes) the client
        try:
            await asyncio.wait_for(proc.wait(), patience / 2)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def _round(variant: str, sink: Sink, requests: int) -> dict[str, Any]:
    """One fresh server: warm up, measure, stop; what reached the sink."""
    what = "signals" if variant in WIRE else "events"  # the sink counts each kind apart
    before = await sink.count(what)
    async with _server(variant, sink) as (_, port):
        warm = max(requests // 10, 200)
        await _drive(port, warm)
        cpu0 = (await _get(port, "/_cpu"))["cpu"]
        result = await _drive(port, requests)
        cpu1 = (await _get(port, "/_cpu"))["cpu"]
        await _get(port, "/_close")
    await asyncio.sleep(0.2)
    result["cpu_us"] = (cpu1 - cpu0) / requests * 1e6
    result["rate"] = result["answered"] / result["elapsed"]
    result["delivered"] = await sink.count(what) - before
    # The middleware also signals the three control requests (/_cpu twice, /_close).
    control = 3 if variant == "middleware" else 0
    result["sent_total"] = (warm + requests + control) if variant in SIGNALLING else 0
    return result


# ----------------------------------------------------------------------------- instructions

#: Requests counted per variant under callgrind (after ``COUNT_WARMUP`` uncounted ones):
#: about 30 ms each there, so a variant takes about a minute.
COUNT_REQUESTS = 1_500
COUNT_WARMUP = 300
#: Fresh servers counted per variant, taking turns; the figure is their median. The count
#: does not move with the machine's load, but the SDK's does move a little from one server to
#: the next (about half a point of the no-SDK request): how many requests each POST carries
#: and when the collector runs depend on the pace, which valgrind makes uneven.
COUNT_ROUNDS = 3
#: The variants counted: the SDK's, the A/A pair and the hand-written limit.
COUNTED = ("none", "none-again", "hand", "nowait", "middleware")


def _callgrind() -> tuple[str, str] | None:
    """valgrind and callgrind_control, when both are installed."""
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    return (valgrind, control) if valgrind and control else None


async def _control(control: str, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        control, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    if await asyncio.wait_for(proc.wait(), 120) != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed")


async def _count_round(variant: str, sink: Sink, requests: int, tools: tuple[str, str]) -> float:
    """Instructions the server of ``variant`` executes per request, warm, under callgrind."""
    valgrind, control = tools
    with tempfile.TemporaryDirectory() as tmp:
        wrap = (
            valgrind, "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no",
            f"--callgrind-out-file={tmp}/cg.%p", f"--log-file={tmp}/valgrind.log",
        )  # fmt: skip
        async with _server(variant, sink, wrap, patience=600.0) as (pid, port):
            await _drive(port, COUNT_WARMUP)
            await _control(control, "-i", "on", str(pid))
            await _drive(port, requests)
            await _control(control, "-d", str(pid))  # writes cg.<pid>.1: the counted part
            await _control(control, "-i", "off", str(pid))
            await _get(port, "/_close")
        dump = Path(tmp) / f"cg.{pid}.1"
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1]) / requests
    raise RuntimeError(f"no instruction count in {dump.name}")


async def instructions(s: Settings, sink: Sink) -> list[Row]:
    """Instructions per request of each variant's server, against the no-SDK server's."""
    tools = _callgrind()
    why = None
    if s.quick:
        why = "quick mode: the instruction count runs in the full suite only"
    elif tools is None:
        why = "valgrind is not installed (apt-get install valgrind)"
    elif not (_installed("fastapi") and _installed("uvicorn")):
        why = "fastapi and uvicorn are not installed: pip install -e '.[bench]'"
    if why is not None or tools is None:
        print(f"    service-count: skipped: {why}", file=sys.stderr, flush=True)
        return [Row("service-count", "service instructions per request", None, "", note=why or "")]
    counts: dict[str, list[float]] = {variant: [] for variant in COUNTED}
    for k in range(COUNT_ROUNDS):
        shift = k % len(COUNTED)  # round-robin, as in the timed figure
        for variant in COUNTED[shift:] + COUNTED[:shift]:
            counts[variant].append(await _count_round(variant, sink, COUNT_REQUESTS, tools))
    got = {variant: median(each) for variant, each in counts.items()}
    base = got["none"]
    rows: list[Row] = []
    for variant in COUNTED[1:]:
        share = got[variant] / base - 1.0
        # Each round's share against the same round's no-SDK count: the spread beside the median.
        shares = [n / b - 1.0 for n, b in zip(counts[variant], counts["none"], strict=True)]
        ours = variant in OURS
        rows.append(
            Row(
                f"service-count.{variant}",
                f"server instructions per request, {LABELS[variant]} ({share * 100:+.1f} %)",
                got[variant],
                "instr",
                base,
                "≤ +5.1 % (+10 µs of 198 µs)" if ours else "—",
                met=(share <= TARGET_SHARE) if ours else None,
                note=(
                    f"callgrind, {COUNT_REQUESTS} requests after {COUNT_WARMUP} over "
                    f"{CONNECTIONS} connections, median of {COUNT_ROUNDS} servers each "
                    f"(rounds {', '.join(f'{x * 100:+.1f} %' for x in shares)}); "
                    f"{got[variant] - base:+,.0f} instructions per request; at the issue's "
                    f"198 µs no-SDK request that is {share * 198:+.1f} µs"
                ),
                extra={
                    "label": LABELS[variant],
                    "share": share,
                    "rounds": counts[variant],
                    "baseline_rounds": counts["none"],
                },
            )
        )
    return rows


# ----------------------------------------------------------------------------- the shares

#: Whose code a sampled frame is, by the package directory in its file name. In the server,
#: aiohttp (and yarl, multidict) runs only for the SDK's sending.
_OWNERS = (
    ("telemetrydeck_async", "SDK"),
    ("aiohttp", "SDK sending"),
    ("yarl", "SDK sending"),
    ("multidict", "SDK sending"),
    *((name, "web stack") for name in ("uvicorn", "h11", "starlette", "fastapi", "pydantic")),
    ("anyio", "web stack"),
)


def owner_shares(raw: str) -> dict[str, float]:
    """The share of samples per owner, from py-spy's ``--format raw`` output.

    Each sample goes to the innermost frame of a known owner: the middleware's frame wraps
    the whole app, so a sample inside the app belongs to the web stack, not to the SDK.
    """
    counts: dict[str, int] = {}
    total = 0
    for row in raw.splitlines():
        stack, _, count = row.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        who = "asyncio, other"
        for frame in reversed(stack.split(";")):
            found = next((o for pkg, o in _OWNERS if f"/{pkg}/" in frame), None)
            if found is not None:
                who = found
                break
        counts[who] = counts.get(who, 0) + int(count)
        total += int(count)
    return {who: n / total for who, n in sorted(counts.items())} if total else {}


def shares(variant: str, requests: int) -> dict[str, float]:
    """Sample a loaded server of ``variant`` with py-spy: the share of its time per owner.

    A measure that the machine's load hardly moves (both sides slow down alike), where the
    end-to-end CPU per request on a busy machine does not resolve a few µs.
    """
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "samples.txt"
        asyncio.run(_sample(variant, requests, py_spy, out))
        return owner_shares(out.read_text())


async def _sample(variant: str, requests: int, py_spy: str, out: Path) -> None:
    async with Sink() as sink, _server(variant, sink) as (pid, port):
        await _drive(port, max(requests // 10, 200))
        spy = await asyncio.create_subprocess_exec(
            py_spy, "record", "-p", str(pid), "--format", "raw", "-o", str(out),
            "--rate", "400", "--nonblocking", "--full-filenames",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(1.0)  # py-spy attached
        await _drive(port, requests)
        spy.send_signal(signal.SIGINT)  # py-spy writes its file and ends
        await asyncio.wait_for(spy.wait(), 60)


def variants(quick: bool) -> tuple[list[str], list[str]]:
    """The variants that can run here, and why the others cannot."""
    skipped = []
    if not (_installed("fastapi") and _installed("uvicorn")):
        return [], ["fastapi and uvicorn are not installed: pip install -e '.[bench]'"]
    run = ["none", "none-again", "hand", "nowait", "middleware"]
    if quick:  # CI: the SDK's variants only, to stay fast
        return run, ["quick mode: the peers' variants run in the full suite only"]
    if _installed("posthog") and _installed("httpx"):
        run.append("posthog")
    else:
        skipped.append("posthog not installed (the bench extra)")
    if _installed("segment.analytics"):
        run.append("segment")
    else:
        skipped.append("segment-analytics-python not installed (the bench extra)")
    return run, skipped


LABELS = {
    "none": "no analytics",
    "none-again": "no analytics again (A/A)",
    "hand": "same-bytes hand-written client in the handler",
    "nowait": "`td.signal_nowait()` in the handler",
    "middleware": "`TelemetryMiddleware`",
    "posthog": "posthog `AsyncClient.capture()` in the handler",
    "segment": "segment `track()` in the handler",
}


def paired(
    got: dict[str, list[dict[str, Any]]], variant: str, key: str, ratio: bool = False
) -> tuple[float, float]:
    """The median over rounds of ``variant``'s ``key`` against the same round's ``none``.

    A difference (or a ratio), and the spread of the rounds (half their range): the rounds
    run at different moments of a shared machine, and pairing each with its own baseline
    takes the drift between rounds out of the figure.
    """
    each = [
        (r[key] / b[key]) if ratio else (r[key] - b[key])
        for r, b in zip(got[variant], got["none"], strict=True)
    ]
    return median(each), (max(each) - min(each)) / 2


async def service(s: Settings, sink: Sink) -> list[Row]:
    """Requests/s, p99 and server CPU per request for each variant, against no SDK."""
    run, skipped = variants(s.quick)
    for reason in skipped:
        print(f"    service: skipped: {reason}", file=sys.stderr, flush=True)
    if not run:
        return [Row("service", "service benchmark", None, "", note="skipped: " + skipped[0])]
    got: dict[str, list[dict[str, Any]]] = {v: [] for v in run}
    for k in range(s.service_rounds):
        # Round-robin, starting one later each round: no variant always runs first (on a cold
        # machine) or right after the heaviest one.
        shift = k % len(run)
        for variant in run[shift:] + run[:shift]:
            got[variant].append(await _round(variant, sink, s.service_requests))

    def med(variant: str, key: str) -> float:
        return median([r[key] for r in got[variant]])

    base_rate, base_p99, base_cpu = (
        med("none", "rate"),
        med("none", "p99_ms"),
        med("none", "cpu_us"),
    )
    aa_cpu, aa_spread = paired(got, "none-again", "cpu_us")
    aa_rate, aa_rate_spread = paired(got, "none-again", "rate", ratio=True)
    # A target is judged only when the A/A pair (no difference at all) stays well inside it,
    # over enough rounds for a spread to mean something.
    enough = s.service_rounds >= 3
    resolvable = enough and aa_spread < 10.0 and abs(aa_cpu) < 5.0
    rate_resolvable = enough and aa_rate_spread < 0.05 and abs(aa_rate - 1.0) < 0.025
    rows: list[Row] = []
    for variant in run:
        results = got[variant]
        ours = variant in OURS
        errors = sum(r["errors"] for r in results)
        lost = sum(r["sent_total"] - r["delivered"] for r in results)
        rate_ratio, rate_spread = paired(got, variant, "rate", ratio=True)
        note = (
            f"{s.service_requests} requests x {len(results)} rounds over {CONNECTIONS} "
            f"connections; paired req/s ratio {rate_ratio:.3f} ± {rate_spread:.3f} (A/A "
            f"{aa_rate:.3f} ± {aa_rate_spread:.3f}); "
            f"p99 {med(variant, 'p99_ms'):.2f} ms (no SDK {base_p99:.2f} ms), "
            f"p50 {med(variant, 'p50_ms'):.2f} ms"
        )
        if variant in SIGNALLING:
            note += f"; signals not delivered: {max(lost, 0)}"
        if errors:
            note += f"; {errors} non-200 answers"
        rate = Row(
            f"service.{variant}.rate",
            f"service req/s, {LABELS[variant]}",
            med(variant, "rate"),
            "/s",
            base_rate,
            "≥ 0.95x no SDK" if ours else "—",
            met=(rate_ratio >= 0.95 if rate_resolvable else None) if ours else None,
            note=note,
            extra={"rounds": results, "label": LABELS[variant], "paired_ratio": rate_ratio},
        )
        extra_cpu, spread = paired(got, variant, "cpu_us")
        cpu = Row(
            f"service.{variant}.cpu",
            f"server CPU per request, {LABELS[variant]} ({extra_cpu:+.1f} ± {spread:.1f} µs)",
            med(variant, "cpu_us"),
            "µs",
            base_cpu,
            "≤ +10 µs" if ours else "—",
            # Judged only when the A/A pair shows the machine can resolve 10 µs at all.
            met=(extra_cpu <= 10.0 if resolvable else None) if ours else None,
            note=(
                "all threads of the server process, read by the app before and after the load; "
                f"paired with each round's no-SDK server: {extra_cpu:+.1f} µs median, rounds "
                f"spread ± {spread:.1f} µs; the A/A pair (the same app twice): "
                f"{aa_cpu:+.1f} ± {aa_spread:.1f} µs"
                + ("" if resolvable else " -- not enough to judge +10 µs on this run")
            ),
            extra={"paired_us": extra_cpu, "spread_us": spread},
        )
        rows += [rate, cpu]
    if skipped:
        rows[-1].note += "; skipped: " + "; ".join(skipped)
    return rows


def main() -> None:
    """Entry point of the helper processes."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve")
    serve_p.add_argument("--variant", choices=VARIANTS, required=True)
    serve_p.add_argument("--sink", required=True)
    drive_p = sub.add_parser("drive")
    drive_p.add_argument("--port", type=int, required=True)
    drive_p.add_argument("--requests", type=int, required=True)
    drive_p.add_argument("--connections", type=int, default=CONNECTIONS)
    shares_p = sub.add_parser("shares")
    shares_p.add_argument("--variant", choices=VARIANTS, default="middleware")
    shares_p.add_argument("--requests", type=int, default=15_000)
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.variant, args.sink)
    elif args.command == "drive":
        drive(args.port, args.requests, args.connections)
    else:
        found = shares(args.variant, args.requests)
        print(f"where the {args.variant} server's time goes ({args.requests} requests, py-spy):")
        for who, share in found.items():
            print(f"  {who:16s} {share * 100:5.1f} %")


if __name__ == "__main__":
    main()
