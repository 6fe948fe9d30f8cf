"""The WSGI middleware: in-process with a plain WSGI app, and a Flask app under gunicorn.

The gunicorn runs (``serve_and_stop``, shared with tests/integrations/test_django.py) use
sync workers, 3 of them, ``--preload`` (the client is made and used in the master), 300
requests with a unique id each, the endpoint failing for a while in the middle, then SIGTERM:
every id must reach the emulator once, and every process's books must balance.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from telemetrydeck_async import SyncTelemetryClient, TelemetryClient
from telemetrydeck_async.devserver import IngestEmulator
from telemetrydeck_async.wsgi import TelemetryMiddleware, route_of
from tests import _proc
from tests.helpers import FAST_RETRY, ThreadedEmulator

REQUEST_SIGNAL = "HTTP.Request.completed"
BOUND = 90.0


def _no_control_socket() -> list[str]:
    from gunicorn.config import KNOWN_SETTINGS  # type: ignore[import-untyped]  # no type hints

    names = {s.name for s in KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


async def _get_all(port: int, paths: list[str], concurrency: int = 6) -> list[int]:
    """GET every path (a few at a time, so every worker serves); return the statuses."""
    statuses: list[int] = []
    queue = list(reversed(paths))

    async def worker(http: aiohttp.ClientSession) -> None:
        while queue:
            async with http.get(queue.pop()) as response:
                await response.read()
                statuses.append(response.status)

    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return statuses


def _books(lines: Iterable[str]) -> list[tuple[int, ...]]:
    """The ``BOOKS pid enqueued sent spooled dropped pending`` lines of every process."""
    found = []
    for line in lines:
        match = re.fullmatch(r"BOOKS (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", line)
        if match:
            found.append(tuple(int(n) for n in match.groups()))
    return found


async def serve_and_stop(
    emulator: IngestEmulator,
    procs: list[_proc.Proc],
    target: str,
    path: str,
    route: str,
    spool_dir: Path | None,
) -> None:
    """Run ``target`` under gunicorn (sync, 3 workers, --preload), 300 requests, SIGTERM."""
    pytest.importorskip("gunicorn")
    env = _proc.script_env(
        TD_BASE_URL=emulator.base_url,
        TD_SPOOL_DIR=str(spool_dir) if spool_dir else "",
        PYTHONWARNINGS="ignore",
    )
    proc = await _proc.start(
        "-m", "gunicorn", "--preload", "--workers", "3", "--worker-class", "sync",
        "--bind", "127.0.0.1:0", "--graceful-timeout", "30", *_no_control_socket(), target,
        env=env,
    )  # fmt: skip
    procs.append(proc)
    port = int(re.findall(r":(\d+)", await proc.wait_for("Listening at", stream="err"))[-1])
    ids = [f"req-{i}" for i in range(300)]
    statuses = await _get_all(port, [path.format(i) for i in ids[:100]])
    emulator.faults.status_always = 503  # the endpoint fails for the middle third
    statuses += await _get_all(port, [path.format(i) for i in ids[100:200]])
    emulator.faults.status_always = None
    statuses += await _get_all(port, [path.format(i) for i in ids[200:]])
    assert statuses == [200] * 300
    proc.send_signal(signal.SIGTERM)
    assert await proc.finish(BOUND) == 0, proc.output
    assert any(r.status == 503 for r in emulator.requests)  # the outage did hit deliveries
    books = _books(proc.out)
    assert len(books) == 4, proc.output  # the master and 3 workers
    for _pid, enqueued, sent, spooled, dropped, pending in books:
        assert enqueued == sent + spooled + dropped + pending, proc.output
        assert (dropped, pending) == (0, 0), proc.output
    if spool_dir is not None:
        assert (spool_dir / "spool.sqlite3").exists() or any(spool_dir.iterdir())  # noqa: ASYNC240
        # What the workers' close left on disk is the next run's to send.
        async with TelemetryClient(
            "test-app", base_url=emulator.base_url, retry=FAST_RETRY, spool_dir=str(spool_dir)
        ) as td:
            await td.flush(timeout=BOUND)
            assert await emulator.wait_for_signals(601, timeout=BOUND)
    assert emulator.distinct_ids() == {*ids, "master"}
    assert emulator.duplicates() == 0
    routes = Counter(
        (s["payload"]["HTTP.Request.route"], s["payload"]["HTTP.Response.statusClass"])
        for s in emulator.signals
        if s["type"] == REQUEST_SIGNAL
    )
    assert routes == {(route, "2xx"): 300}
    workers = {s["sessionID"] for s in emulator.signals if s["type"] == "Web.Hello.served"}
    assert 1 <= len(workers) <= 3  # one session per worker; never the master's


@pytest.mark.slow
@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spool"])
async def test_flask_under_gunicorn_preload_delivers_every_request_id(
    emulator: IngestEmulator, procs: list[_proc.Proc], tmp_path: Path, spooled: bool
) -> None:
    """Flask + TelemetryMiddleware, gunicorn sync x3 --preload, outage mid-way: nothing lost."""
    pytest.importorskip("flask")
    await serve_and_stop(
        emulator,
        procs,
        "tests.scripts.wsgi_app:app",
        "/hello/{}",
        "/hello/<name>",
        tmp_path / "spool" if spooled else None,
    )


# ----------------------------------------------------------------------------- in process


def _app(status: str, body: list[bytes]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(status, [("Content-Type", "text/plain")])
        return body

    return app


class _Closing(list[bytes]):
    closed = False

    def close(self) -> None:
        self.closed = True


def test_the_middleware_signals_once_the_body_is_closed(
    threaded_emulator: ThreadedEmulator,
) -> None:
    """A plain WSGI app: status class, method and (unmatched) route; the app's close() runs."""
    body = _Closing([b"hi"])
    with SyncTelemetryClient(
        "test-app", base_url=threaded_emulator.emu.base_url, default_user="u", retry=FAST_RETRY
    ) as td:
        wrapped = TelemetryMiddleware(_app("404 Not Found", body), td)
        seen: list[str] = []
        result = wrapped({"REQUEST_METHOD": "GET", "PATH_INFO": "/x"}, lambda s, h: seen.append(s))
        assert list(result) == [b"hi"]
        assert td.stats.enqueued == 0  # not before the server closed the body
        result.close()  # type: ignore[attr-defined]
        assert body.closed
        assert seen == ["404 Not Found"]
        td.flush()
    (sent,) = threaded_emulator.emu.signals
    assert sent["type"] == REQUEST_SIGNAL
    assert sent["payload"]["HTTP.Request.route"] == "(unmatched)"
    assert sent["payload"]["HTTP.Request.method"] == "GET"
    assert sent["payload"]["HTTP.Response.statusClass"] == "4xx"


def test_an_app_that_raises_is_signalled_as_5xx_and_the_error_passes(
    threaded_emulator: ThreadedEmulator,
) -> None:
    """The app raises: the signal says 5xx, the exception reaches the server unchanged."""

    def broken(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise LookupError("nope")

    with SyncTelemetryClient(
        "test-app", base_url=threaded_emulator.emu.base_url, default_user="u", retry=FAST_RETRY
    ) as td:
        wrapped = TelemetryMiddleware(broken, td, client_user=lambda environ: "user-7")
        with pytest.raises(LookupError):
            wrapped({"REQUEST_METHOD": "POST"}, lambda s, h: None)
        td.flush()
    (sent,) = threaded_emulator.emu.signals
    assert sent["payload"]["HTTP.Response.statusClass"] == "5xx"
    assert sent["clientUser"] != "user-7"  # hashed, never raw


def test_a_filter_skips_requests_and_hooks_that_raise_never_break_one(
    threaded_emulator: ThreadedEmulator,
) -> None:
    """filter=False skips; a raising route or user hook falls back and the request is served."""

    def bad_hook(environ: dict[str, Any]) -> str:
        raise RuntimeError("hook")

    with SyncTelemetryClient(
        "test-app", base_url=threaded_emulator.emu.base_url, default_user="u", retry=FAST_RETRY
    ) as td:
        skipping = TelemetryMiddleware(
            _app("200 OK", [b""]), td, filter=lambda info: info.path != "/healthz"
        )
        skipping({"REQUEST_METHOD": "GET", "PATH_INFO": "/healthz"}, lambda s, h: None).close()  # type: ignore[attr-defined]
        hooked = TelemetryMiddleware(
            _app("200 OK", [b""]), td, route=bad_hook, client_user=bad_hook
        )
        hooked({"REQUEST_METHOD": "GET", "PATH_INFO": "/a"}, lambda s, h: None).close()  # type: ignore[attr-defined]
        td.flush()
    (sent,) = threaded_emulator.emu.signals
    assert sent["payload"]["HTTP.Request.route"] == "(unmatched)"


def test_route_of_reads_the_templates_frameworks_leave_in_the_environ() -> None:
    """Flask's url_rule, Bottle's route.rule, Pyramid's matched route; never the raw path."""

    class Obj:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)

    assert route_of({"werkzeug.request": Obj(url_rule=Obj(rule="/a/<id>"))}) == "/a/<id>"
    assert route_of({"werkzeug.request": Obj(url_rule=None)}) == "(unmatched)"
    assert route_of({"bottle.route": Obj(rule="/b/<id>")}) == "/b/<id>"
    assert route_of({"bfg.routes.matched_route": Obj(pattern="/c/{id}")}) == "/c/{id}"
    assert route_of({"PATH_INFO": "/raw/42"}) == "(unmatched)"
