"""Real servers in subprocesses: requests made, server stopped with SIGTERM, signals counted.

The emulator runs in this process on 127.0.0.1:0; its URL reaches the server through the
environment or argv. Every wait is bounded; nothing asserts how long something took.
"""

from __future__ import annotations

import json
import re
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from telemetrydeck_async._spool import open_spool
from telemetrydeck_async.devserver import IngestEmulator
from tests import _proc

REQUEST_SIGNAL = "HTTP.Request.completed"


def port_of(line: str) -> int:
    """The port in a server's 'listening on http://127.0.0.1:PORT' line."""
    match = re.search(r"127\.0\.0\.1:(\d+)", line)
    assert match is not None, line
    return int(match.group(1))


async def get_all(port: int, paths: list[str]) -> list[str]:
    """GET every path on 127.0.0.1:port in order; return the response bodies."""
    bodies = []
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        for path in paths:
            async with http.get(path) as response:
                bodies.append(await response.text())
    return bodies


def request_routes(emulator: IngestEmulator) -> Counter[tuple[str, str]]:
    """(route, status class) of every request signal the emulator accepted."""
    return Counter(
        (s["payload"]["HTTP.Request.route"], s["payload"]["HTTP.Response.statusClass"])
        for s in emulator.signals
        if s["type"] == REQUEST_SIGNAL
    )


async def test_uvicorn_fastapi_app_delivers_every_signal_when_stopped_with_sigterm(
    emulator: IngestEmulator, procs: list[_proc.Proc]
) -> None:
    """Under uvicorn, SIGTERM runs the lifespan shutdown, which sends everything queued."""
    env = _proc.script_env(TD_BASE_URL=emulator.base_url)
    proc = await _proc.start(
        "-m", "uvicorn", "tests.scripts.fastapi_app:app",
        "--host", "127.0.0.1", "--port", "0", "--no-access-log",
        env=env,
    )  # fmt: skip
    procs.append(proc)
    port = port_of(await proc.wait_for("Uvicorn running on", stream="err"))
    await get_all(port, [f"/items/{i}" for i in range(10)] + ["/healthz"] * 3 + ["/missing/1"])
    assert emulator.signals == []  # flush_interval is 60 s: only the shutdown sends
    proc.send_signal(signal.SIGTERM)
    await proc.finish()
    assert "Application shutdown complete" in proc.output
    assert emulator.distinct_ids() == set(range(10))
    assert emulator.duplicates() == 0
    assert request_routes(emulator) == {("/items/{item_id}", "2xx"): 10, ("(unmatched)", "4xx"): 1}


async def test_aiohttp_run_app_delivers_every_signal_when_stopped_with_sigterm(
    emulator: IngestEmulator, procs: list[_proc.Proc]
) -> None:
    """Under web.run_app, SIGTERM runs the cleanup context, which sends everything queued."""
    proc = await _proc.start(str(_proc.SCRIPTS / "aiohttp_app.py"), emulator.base_url)
    procs.append(proc)
    port = port_of("127.0.0.1:" + (await proc.wait_for("^LISTENING")).split()[1])
    await get_all(port, [f"/shop/orders/{i}" for i in range(10)] + ["/healthz"] * 3)
    assert emulator.signals == []
    proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == 0, proc.output
    assert emulator.distinct_ids() == set(range(10))
    assert emulator.duplicates() == 0
    assert request_routes(emulator) == {("/shop/orders/{order_id}", "2xx"): 10}


async def test_aiohttp_run_app_spools_every_signal_when_the_endpoint_is_down(
    emulator: IngestEmulator, procs: list[_proc.Proc], tmp_path: Path
) -> None:
    """With the ingest endpoint unreachable, the SIGTERM cleanup puts every signal in the spool."""
    base_url = emulator.base_url
    await emulator.stop()  # connection refused from now on
    spool_dir = tmp_path / "spool"
    proc = await _proc.start(str(_proc.SCRIPTS / "aiohttp_app.py"), base_url, str(spool_dir))
    procs.append(proc)
    port = port_of("127.0.0.1:" + (await proc.wait_for("^LISTENING")).split()[1])
    await get_all(port, [f"/shop/orders/{i}" for i in range(10)])
    proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == 0, proc.output
    spool = await open_spool(spool_dir)
    try:
        claimed = await spool.claim(1000)
    finally:
        await spool.close()
    types = Counter(json.loads(body)["type"] for _, body in claimed.records)
    assert types == {"Shop.Order.viewed": 10, REQUEST_SIGNAL: 10}


async def test_gunicorn_preload_workers_send_their_own_signals_and_never_the_masters(
    emulator: IngestEmulator, procs: list[_proc.Proc]
) -> None:
    """gunicorn --preload forks workers from a master holding a used client: each worker
    starts clean with its own session, sends its requests' signals once, and the master's
    queued signal is never sent by a worker (the master's exit hook reports it lost)."""
    pytest.importorskip("gunicorn")
    from gunicorn.config import KNOWN_SETTINGS  # type: ignore[import-untyped]  # no type hints

    no_control = (
        ["--no-control-socket"]
        if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)
        else []
    )
    env = _proc.script_env(TD_BASE_URL=emulator.base_url, PYTHONWARNINGS="ignore")
    proc = await _proc.start(
        "-m", "gunicorn", "--preload", "--workers", "2",
        "--worker-class", "uvicorn.workers.UvicornWorker",
        "--bind", "127.0.0.1:0", "--graceful-timeout", "20", *no_control,
        "tests.scripts.preload_app:app",
        env=env,
    )  # fmt: skip
    procs.append(proc)
    port = port_of(await proc.wait_for("Listening at", stream="err"))
    master_session = (await proc.wait_for("^MASTER-SESSION")).split()[1]
    await proc.wait_for("Application startup complete", stream="err")
    pids = await get_all(port, [f"/hello/{i}" for i in range(20)])
    proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == 0, proc.output
    assert request_routes(emulator) == {("/hello/{name}", "2xx"): 20}
    assert emulator.count_by_type().get("Master.Preload.done", 0) == 0
    sessions = {s["sessionID"] for s in emulator.signals}
    assert master_session not in sessions
    assert len(sessions) == len(set(pids))  # one new session per worker that served
    assert "dropped 1 signal(s), reason shutdown" in proc.output
