"""The Django integration: gunicorn --preload with a real project, and the middleware's modes.

The gunicorn runs share ``serve_and_stop`` with tests/integrations/test_wsgi.py: sync workers x3,
``--preload``, 300 requests with unique ids, an outage in the middle, SIGTERM, nothing lost.
The in-process tests configure Django once (settings.configure) and drive the middleware
through Django's test client, sync (WSGI) and async (ASGI).
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from telemetrydeck_async import ConfigurationError, SyncTelemetryClient
from telemetrydeck_async.devserver import IngestEmulator
from tests import _proc
from tests.helpers import FAST_RETRY, ThreadedEmulator

from .test_wsgi import BOUND, REQUEST_SIGNAL, _get_all, serve_and_stop

django = pytest.importorskip("django")


@pytest.mark.slow
@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spool"])
async def test_django_under_gunicorn_preload_delivers_every_request_id(
    emulator: IngestEmulator, procs: list[_proc.Proc], tmp_path: Path, spooled: bool
) -> None:
    """Django + TelemetryMiddleware + TELEMETRYDECK setting, gunicorn sync x3 --preload."""
    await serve_and_stop(
        emulator,
        procs,
        "tests.scripts.django_app:application",
        "/hello/{}/",
        "/hello/<str:name>/",
        tmp_path / "spool" if spooled else None,
    )


@pytest.mark.slow
async def test_django_under_uvicorn_sigterm_sends_what_was_queued(
    emulator: IngestEmulator, procs: list[_proc.Proc]
) -> None:
    """uvicorn re-raises SIGTERM after its shutdown, so no atexit: with_lifespan closes instead.

    The app's flush_interval is 600 s: every signal is still queued at SIGTERM, and only the
    lifespan shutdown's close can deliver it (without with_lifespan, none arrived).
    """
    pytest.importorskip("uvicorn")
    env = _proc.script_env(TD_BASE_URL=emulator.base_url, PYTHONWARNINGS="ignore")
    proc = await _proc.start(
        "-m", "uvicorn", "--host", "127.0.0.1", "--port", "0",
        "tests.scripts.django_asgi_app:application",
        env=env,
    )  # fmt: skip
    procs.append(proc)
    line = await proc.wait_for(r"Uvicorn running on http://127\.0\.0\.1:\d+", stream="err")
    port = int(line.rsplit(":", 1)[1].split()[0])
    ids = [f"req-{i}" for i in range(40)]
    assert await _get_all(port, [f"/hello/{i}/" for i in ids]) == [200] * 40
    assert emulator.signals == []  # still queued: flush_interval is 600 s
    proc.send_signal(signal.SIGTERM)
    await proc.finish(BOUND)
    assert emulator.distinct_ids() == set(ids)
    assert emulator.duplicates() == 0
    assert any("Application shutdown complete" in line for line in proc.err), proc.output
    routes = Counter(
        s["payload"]["HTTP.Request.route"] for s in emulator.signals if s["type"] == REQUEST_SIGNAL
    )
    assert routes == {"/hello/<str:name>/": 40}


# ----------------------------------------------------------------------------- in process


def _view(request: Any, name: str) -> Any:
    from django.http import HttpResponse

    from telemetrydeck_async.django import get_telemetry

    get_telemetry().signal("Web.Hello.served", payload={"Test.id": name})
    return HttpResponse(name)


async def _async_view(request: Any, name: str) -> Any:
    from django.http import HttpResponse

    return HttpResponse(name, status=201)


def _configure() -> None:
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=["testserver"],
            ROOT_URLCONF=__name__,
            SECRET_KEY="test-only",
            MIDDLEWARE=["telemetrydeck_async.django.TelemetryMiddleware"],
        )
        django.setup()


def _urlpatterns() -> list[Any]:
    from django.urls import path

    return [path("hello/<str:name>/", _view), path("async/<str:name>/", _async_view)]


def __getattr__(name: str) -> Any:
    # Django reads ROOT_URLCONF's urlpatterns lazily: built here, after settings exist.
    if name == "urlpatterns":
        return _urlpatterns()
    raise AttributeError(name)


@pytest.fixture
def project(threaded_emulator: ThreadedEmulator) -> Iterator[ThreadedEmulator]:
    """Django configured, with a TELEMETRYDECK setting aimed at the emulator."""
    _configure()
    from django.conf import settings

    import telemetrydeck_async.django as integration

    settings.TELEMETRYDECK = {
        "app_id": "test-app",
        "namespace": "com.example",
        "base_url": threaded_emulator.emu.base_url,
        "default_user": "web-user",
        "retry": FAST_RETRY,
    }
    integration._client = None
    yield threaded_emulator
    if integration._client is not None:
        integration._client.close(timeout=5)
    integration._client = None
    del settings.TELEMETRYDECK


def test_the_sync_middleware_sends_the_starlette_request_signal(project: ThreadedEmulator) -> None:
    """WSGI path: the view's signal and the request signal (route pattern, method, 2xx/4xx)."""
    from django.test import Client

    from telemetrydeck_async.django import get_telemetry

    client = Client()
    assert client.get("/hello/abc/").content == b"abc"
    assert client.get("/missing").status_code == 404
    td = get_telemetry()
    assert isinstance(td, SyncTelemetryClient)
    td.flush()
    requests = sorted(
        (s["payload"]["HTTP.Request.route"], s["payload"]["HTTP.Request.method"],
         s["payload"]["HTTP.Response.statusClass"])
        for s in project.emu.signals
        if s["type"] == "HTTP.Request.completed"
    )  # fmt: skip
    assert requests == [("(unmatched)", "GET", "4xx"), ("/hello/<str:name>/", "GET", "2xx")]
    assert project.emu.distinct_ids() == {"abc"}


async def test_the_async_middleware_never_blocks_the_loop(
    project: ThreadedEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ASGI path: the first signal (which starts the loop thread) is queued off the event loop."""
    import asyncio
    import threading

    from django.test import AsyncClient

    from telemetrydeck_async.django import get_telemetry

    started_in: list[threading.Thread] = []
    original = SyncTelemetryClient._start

    def spy(self: SyncTelemetryClient) -> None:
        started_in.append(threading.current_thread())
        original(self)

    monkeypatch.setattr(SyncTelemetryClient, "_start", spy)
    response = await AsyncClient().get("/async/x/")
    assert started_in
    assert started_in[0] is not threading.current_thread()  # not the event loop's thread
    assert response.status_code == 201
    td = get_telemetry()
    await asyncio.to_thread(td.flush)
    (sent,) = project.emu.signals
    assert sent["payload"]["HTTP.Request.route"] == "/async/<str:name>/"
    assert not td._may_wait()  # started: later requests hand over on the loop directly
    response = await AsyncClient().get("/async/y/")
    await asyncio.to_thread(td.flush)
    assert len(project.emu.signals) == 2


def test_a_bad_setting_is_reported_and_the_request_still_served(
    project: ThreadedEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """TELEMETRYDECK without app_id: ConfigurationError from get_telemetry(); 200 anyway."""
    from django.conf import settings
    from django.test import Client

    from telemetrydeck_async.django import get_telemetry

    settings.TELEMETRYDECK = {"namespace": "com.example"}
    with pytest.raises(ConfigurationError, match="TELEMETRYDECK"):
        get_telemetry()
    response = Client().get("/async/z/")
    assert response.status_code == 201
    assert "telemetry is not configured" in caplog.text


def test_without_the_setting_the_environment_configures_the_client(
    project: ThreadedEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No TELEMETRYDECK setting: from_env() (TELEMETRYDECK_* variables)."""
    from django.conf import settings

    from telemetrydeck_async.django import get_telemetry

    del settings.TELEMETRYDECK
    monkeypatch.setenv("TELEMETRYDECK_APP_ID", "env-app")
    monkeypatch.setenv("TELEMETRYDECK_BASE_URL", project.emu.base_url)
    td = get_telemetry()
    assert td.config.app_id == "env-app"
    assert get_telemetry() is td
    settings.TELEMETRYDECK = {}


def test_request_filter_and_user_settings_are_used(
    project: ThreadedEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TELEMETRYDECK_REQUEST_FILTER skips requests; TELEMETRYDECK_REQUEST_USER names the user."""
    from django.conf import settings
    from django.test import Client

    from telemetrydeck_async.django import TelemetryMiddleware, get_telemetry
    from tests.helpers import sha256_hex

    monkeypatch.setattr(
        settings,
        "TELEMETRYDECK_REQUEST_FILTER",
        lambda info: info.path != "/async/skip/",
        raising=False,
    )
    monkeypatch.setattr(
        settings, "TELEMETRYDECK_REQUEST_USER", lambda request: "user-9", raising=False
    )
    client = Client()
    client.get("/async/skip/")
    client.get("/async/kept/")
    get_telemetry().flush()
    (sent,) = project.emu.signals
    assert sent["clientUser"] == sha256_hex("user-9")
    monkeypatch.setattr(settings, "TELEMETRYDECK_REQUEST_USER", 42, raising=False)
    with pytest.raises(ConfigurationError, match="TELEMETRYDECK_REQUEST_USER"):
        TelemetryMiddleware(lambda request: None)
