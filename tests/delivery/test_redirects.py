"""Redirects from the ingest endpoint: never followed, signals kept, one ERROR, slow probes.

The configured endpoint is a real emulator on loopback behind a switch that answers every
ingest request with a 3xx whose ``Location`` points at a second emulator on another port. That
second emulator must never see a request; once the switch is off, the kept signals arrive at
the configured one.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import attrs
import pytest
from aiohttp import web

from telemetrydeck_async import RedirectError, RetryPolicy, TelemetryClient
from telemetrydeck_async.devserver import IngestEmulator, build_app
from tests.helpers import wait_until

#: Slow probes, in test time: a client that followed no slow-probe rule would send hundreds.
PROBE = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, auth_probe_interval=0.3)
N = 250
BOUND = 30.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@attrs.define
class Redirecting:
    """An emulator served behind a switch: while ``status`` is set, every POST is redirected."""

    emulator: IngestEmulator
    target: str
    status: int | None = None
    redirected: int = 0
    url: str = ""

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.status is not None and request.method == "POST":
            self.redirected += 1
            return web.Response(status=self.status, headers={"Location": self.target})
        return await handler(request)


@pytest.fixture
async def elsewhere() -> AsyncIterator[IngestEmulator]:
    """Where the redirects point: another emulator, on another port."""
    async with IngestEmulator(host="127.0.0.1", port=0) as emu:
        yield emu


@pytest.fixture
async def redirecting(elsewhere: IngestEmulator) -> AsyncIterator[Redirecting]:
    """The configured endpoint, redirecting to ``elsewhere`` while its switch is on."""
    emu = IngestEmulator()
    server = Redirecting(emu, target=f"{elsewhere.base_url}/v2/namespace/com.example/")
    app = build_app(emu)
    app.middlewares.append(server.middleware)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


def redirect_client(
    server: Redirecting, errors: list[BaseException], **options: object
) -> TelemetryClient:
    return TelemetryClient(
        "redirect-app",
        namespace="com.example",
        base_url=server.url,
        default_user="u",
        retry=PROBE,
        flush_interval=0.1,
        on_error=errors.append,
        **options,  # type: ignore[arg-type]
    )


async def send(td: TelemetryClient) -> None:
    for i in range(N):
        await td.signal("Redirect.case", payload={"Test.id": i})


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_keeps_the_signals_in_memory_and_is_never_followed(
    status: int,
    redirecting: Redirecting,
    elsewhere: IngestEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """3xx: nothing dropped or sent elsewhere, one ERROR naming Location, probes stay rare."""
    caplog.set_level(logging.WARNING, logger="telemetrydeck_async")
    redirecting.status = status
    errors: list[BaseException] = []
    async with redirect_client(redirecting, errors) as td:
        await send(td)
        kept = await td.flush()
        assert kept.dropped == {}
        assert kept.pending == N
        # Wait for two more probes: a client without the slow-probe rule would have sent
        # every batch again and again by then.
        assert await wait_until(lambda: redirecting.redirected >= 3, BOUND)
        assert redirecting.redirected <= 5
        assert td.stats.dropped == {}
        assert td.stats.pending == N
        assert elsewhere.requests == []
        refusals = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(refusals) == 1
        assert redirecting.target in refusals[0].getMessage()
        assert "base_url" in refusals[0].getMessage()
        assert isinstance(errors[0], RedirectError)
        assert errors[0].location == redirecting.target
        assert errors[0].status == status
        assert td.stats.last_error is not None
        assert td.stats.last_error.type == "RedirectError"
        redirecting.status = None  # base_url fixed at the server side: the probe gets through
        assert await wait_until(lambda: td.stats.sent == N, BOUND)
    assert redirecting.emulator.distinct_ids() == set(range(N))
    assert elsewhere.requests == []


@pytest.mark.parametrize("status", [301, 307])
async def test_a_redirect_with_a_spool_spools_the_signals_and_the_probe_sends_them(
    status: int, redirecting: Redirecting, elsewhere: IngestEmulator, tmp_path: Path
) -> None:
    """With a spool the redirected batches go to disk; the same client sends them afterwards."""
    redirecting.status = status
    errors: list[BaseException] = []
    async with redirect_client(redirecting, errors, spool_dir=str(tmp_path)) as td:
        await send(td)
        assert await wait_until(lambda: td.stats.spooled == N, BOUND)
        assert td.stats.dropped == {}
        assert td.stats.pending == 0
        assert await wait_until(
            lambda: redirecting.redirected >= 3, BOUND
        )  # probes with spooled batches
        assert td.stats.spool_dropped == {}
        redirecting.status = None
        assert await wait_until(lambda: len(redirecting.emulator.distinct_ids()) == N, BOUND)
    assert redirecting.emulator.distinct_ids() == set(range(N))
    assert elsewhere.requests == []
    assert all(isinstance(e, RedirectError) for e in errors)
