"""The Starlette/FastAPI and aiohttp.web integrations, served in this process on loopback.

Starlette apps are driven through httpx's ASGI transport with their lifespan run explicitly;
aiohttp apps by a real AppRunner on 127.0.0.1:0. Signals go to the real emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from telemetrydeck_async import ConfigurationError, InvalidSignalError, TelemetryClient
from telemetrydeck_async import aiohttp_web as td_aiohttp
from telemetrydeck_async import starlette as td_starlette
from telemetrydeck_async.devserver import IngestEmulator
from tests import _proc
from tests.helpers import FAST_RETRY, sha256_hex

BOUND = 30.0
REQUEST_SIGNAL = "HTTP.Request.completed"


@pytest.fixture
def factory(emulator: IngestEmulator) -> Callable[[], TelemetryClient]:
    """Makes clients aimed at the emulator that send nothing before they are closed."""

    def make() -> TelemetryClient:
        return TelemetryClient(
            "test-app",
            namespace="com.example",
            base_url=emulator.base_url,
            default_user="web-user",
            flush_interval=60,
            retry=FAST_RETRY,
        )

    return make


@contextlib.asynccontextmanager
async def asgi(app: Any, *, lifespan: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for ``app``, inside the app's lifespan (startup ... shutdown)."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with contextlib.AsyncExitStack() as stack:
        if lifespan:
            await stack.enter_async_context(app.router.lifespan_context(app))
        client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        yield await stack.enter_async_context(client)


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[aiohttp.ClientSession]:
    """Run ``app`` on 127.0.0.1:0; yield a session whose base URL is the server."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            yield session
    finally:
        await runner.cleanup()


def request_routes(emulator: IngestEmulator) -> list[str]:
    """The route of every per-request signal the emulator accepted, in order."""
    return [s["payload"]["HTTP.Request.route"] for s in request_signals(emulator)]


def request_signals(emulator: IngestEmulator) -> list[dict[str, Any]]:
    """The per-request signals the emulator accepted."""
    return [s for s in emulator.signals if s["type"] == REQUEST_SIGNAL]


def http_payload(signal: dict[str, Any]) -> dict[str, Any]:
    """The request-signal keys of a signal's payload."""
    return {k: v for k, v in signal["payload"].items() if k.startswith("HTTP.")}


def not_a_client() -> Any:
    """A broken client factory."""
    return "not a client"


async def ok(request: Request) -> PlainTextResponse:
    """A Starlette endpoint answering 200."""
    return PlainTextResponse("ok")


async def boom(request: Request) -> PlainTextResponse:
    """A Starlette endpoint that fails."""
    raise RuntimeError("boom")


# ----------------------------------------------------------------------------- packaging


def test_importing_the_package_does_not_import_web_frameworks() -> None:
    """import telemetrydeck_async leaves starlette, fastapi and uvicorn unimported."""
    code = (
        "import sys, telemetrydeck_async; "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in {'starlette', 'fastapi', 'uvicorn'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_proc.script_env(),
        capture_output=True,
        text=True,
        timeout=BOUND,
        check=True,
    )
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- Starlette


async def test_lifespan_starts_the_client_and_closes_it_at_shutdown(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """The client is on app.state while the app runs; shutdown flushes and closes it."""

    async def tick(request: Request) -> PlainTextResponse:
        await td_starlette.get_telemetry(request).signal("Web.Page.viewed")
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/tick", tick)], lifespan=td_starlette.telemetry_lifespan(factory)
    )
    async with asgi(app) as http:
        assert (await http.get("/tick")).status_code == 200
        td = app.state.telemetry
        assert emulator.signals == []
    assert td.closed
    assert [s["type"] for s in emulator.signals] == ["Web.Page.viewed"]


async def test_lifespan_runs_the_apps_own_lifespan_inside(
    factory: Callable[[], TelemetryClient],
) -> None:
    """A user lifespan passed to telemetry_lifespan runs with the client already started."""
    seen: list[bool] = []

    @contextlib.asynccontextmanager
    async def own(app: Starlette) -> AsyncIterator[None]:
        seen.append(app.state.telemetry.closed)
        yield
        seen.append(app.state.telemetry.closed)

    app = Starlette(lifespan=td_starlette.telemetry_lifespan(factory, lifespan=own))
    async with asgi(app):
        pass
    assert seen == [False, False]
    assert app.state.telemetry.closed


async def test_get_telemetry_works_as_a_fastapi_dependency(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """Depends(get_telemetry) hands a FastAPI endpoint the app's client."""
    app = FastAPI(lifespan=td_starlette.telemetry_lifespan(factory))

    @app.get("/items/{item_id}")
    async def read(
        item_id: int,
        td: Annotated[TelemetryClient, Depends(td_starlette.get_telemetry)],
    ) -> dict[str, int]:
        await td.signal("Items.Item.viewed", payload={"Test.id": item_id})
        return {"item_id": item_id}

    async with asgi(app) as http:
        assert (await http.get("/items/7")).json() == {"item_id": 7}
    assert emulator.distinct_ids() == {7}


async def test_get_telemetry_without_the_lifespan_raises_configuration_error() -> None:
    """An endpoint asking for the client of an app without the lifespan gets a clear error."""
    errors: list[Exception] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        try:
            td_starlette.get_telemetry(request)
        except Exception as exc:
            errors.append(exc)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    async with asgi(app, lifespan=False) as http:
        await http.get("/")
    assert len(errors) == 1
    assert isinstance(errors[0], ConfigurationError)
    assert "telemetry_lifespan" in str(errors[0])


async def test_middleware_sends_route_template_method_status_class_and_duration(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """One signal per request: the route template (not the path), method, 2xx, ms duration."""
    app = FastAPI(lifespan=td_starlette.telemetry_lifespan(factory))
    app.add_middleware(td_starlette.TelemetryMiddleware)

    @app.post("/users/{user_id}/orders")
    async def create(user_id: str) -> dict[str, str]:
        return {"user": user_id}

    async with asgi(app) as http:
        assert (await http.post("/users/u-981273/orders")).status_code == 200
    (signal,) = request_signals(emulator)
    assert http_payload(signal) == {
        "HTTP.Request.route": "/users/{user_id}/orders",
        "HTTP.Request.method": "POST",
        "HTTP.Response.statusClass": "2xx",
    }
    assert signal["floatValue"] >= 0
    assert "u-981273" not in repr(emulator.batches)


async def test_middleware_signal_type_is_configurable(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """signal_type= renames the per-request signal."""
    app = Starlette(routes=[Route("/", ok)], lifespan=td_starlette.telemetry_lifespan(factory))
    app.add_middleware(td_starlette.TelemetryMiddleware, signal_type="Backend.Request.served")
    async with asgi(app) as http:
        await http.get("/")
    assert [s["type"] for s in emulator.signals] == ["Backend.Request.served"]


async def test_middleware_reports_unmatched_requests_without_their_path(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """A request no route matches is sent as route (unmatched) and 4xx; the path is not sent."""
    app = Starlette(routes=[Route("/", ok)], lifespan=td_starlette.telemetry_lifespan(factory))
    app.add_middleware(td_starlette.TelemetryMiddleware)
    async with asgi(app) as http:
        assert (await http.get("/private/token-5521")).status_code == 404
    (signal,) = request_signals(emulator)
    assert signal["payload"]["HTTP.Request.route"] == "(unmatched)"
    assert signal["payload"]["HTTP.Response.statusClass"] == "4xx"
    assert "token-5521" not in repr(emulator.batches)


async def test_middleware_builds_the_whole_template_through_mounts(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """A route inside a Mount is reported with the mount's prefix template in front."""
    app = Starlette(
        routes=[Mount("/shops/{shop}", routes=[Route("/orders/{order_id}", ok)])],
        lifespan=td_starlette.telemetry_lifespan(factory),
    )
    app.add_middleware(td_starlette.TelemetryMiddleware)
    async with asgi(app) as http:
        assert (await http.get("/shops/acme/orders/17")).status_code == 200
    (signal,) = request_signals(emulator)
    assert signal["payload"]["HTTP.Request.route"] == "/shops/{shop}/orders/{order_id}"


async def test_middleware_filter_skips_requests(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """Requests the filter refuses (a health check) send nothing; the others do."""
    app = Starlette(
        routes=[Route("/healthz", ok), Route("/", ok)],
        lifespan=td_starlette.telemetry_lifespan(factory),
    )
    app.add_middleware(
        td_starlette.TelemetryMiddleware, filter=lambda info: info.path != "/healthz"
    )
    async with asgi(app) as http:
        await http.get("/healthz")
        await http.get("/")
    routes = [s["payload"]["HTTP.Request.route"] for s in request_signals(emulator)]
    assert routes == ["/"]


async def test_middleware_reports_5xx_when_the_app_raises(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """An endpoint that raises is counted as 5xx and the error still reaches the server."""
    app = Starlette(
        routes=[Route("/boom", boom)], lifespan=td_starlette.telemetry_lifespan(factory)
    )
    app.add_middleware(td_starlette.TelemetryMiddleware)
    async with asgi(app) as http:
        assert (await http.get("/boom")).status_code == 500
    (signal,) = request_signals(emulator)
    assert signal["payload"]["HTTP.Response.statusClass"] == "5xx"


async def test_middleware_hashes_the_user_from_the_client_user_hook(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """client_user= picks the request's user, which is hashed like any other user id."""
    app = Starlette(routes=[Route("/", ok)], lifespan=td_starlette.telemetry_lifespan(factory))
    app.add_middleware(
        td_starlette.TelemetryMiddleware,
        client_user=lambda conn: conn.headers.get("x-user"),
    )
    async with asgi(app) as http:
        await http.get("/", headers={"x-user": "alice"})
    (signal,) = request_signals(emulator)
    assert signal["clientUser"] == sha256_hex("alice")


async def test_middleware_without_a_client_still_serves_the_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With no client anywhere the response is unaffected and one warning says why."""
    app = Starlette(routes=[Route("/", ok)])
    app.add_middleware(td_starlette.TelemetryMiddleware)
    async with asgi(app, lifespan=False) as http:
        assert (await http.get("/")).text == "ok"
    assert "no TelemetryClient for the request signal" in caplog.text


async def test_middleware_sends_one_signal_per_request(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """Every request to a route sends its own signal, each with the route's template."""
    app = Starlette(
        routes=[Route("/orders/{order_id}", ok)], lifespan=td_starlette.telemetry_lifespan(factory)
    )
    app.add_middleware(td_starlette.TelemetryMiddleware)
    async with asgi(app) as http:
        for order_id in range(3):
            await http.get(f"/orders/{order_id}")
    assert request_routes(emulator) == ["/orders/{order_id}"] * 3


async def test_middleware_uses_the_new_client_of_a_restarted_app(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """An app started again gets a new client: the middleware sends through it, not the old."""
    app = Starlette(
        routes=[Route("/orders/{order_id}", ok)], lifespan=td_starlette.telemetry_lifespan(factory)
    )
    app.add_middleware(td_starlette.TelemetryMiddleware)
    clients = []
    for order_id in range(2):
        async with asgi(app) as http:
            await http.get(f"/orders/{order_id}")
            clients.append(app.state.telemetry)
    assert clients[0] is not clients[1]
    assert all(td.closed and td.stats.sent == 1 for td in clients)
    assert request_routes(emulator) == ["/orders/{order_id}"] * 2


async def test_middleware_finds_the_route_by_endpoint_when_the_router_does_not_name_it(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """Without scope["route"] (older Starlette), the template is found from the endpoint."""
    inner = Starlette(routes=[Mount("/shop", routes=[Route("/orders/{order_id}", ok)])])

    async def like_an_older_router(scope: Any, receive: Any, send: Any) -> None:
        await inner(scope, receive, send)
        scope.pop("route", None)

    async with factory() as td:
        app = td_starlette.TelemetryMiddleware(like_an_older_router, client=td)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            assert (await http.get("/shop/orders/5")).status_code == 200
    assert request_routes(emulator) == ["/shop/orders/{order_id}"]


async def test_middleware_passes_lifespan_events_through(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """Non-HTTP scopes (the lifespan, websockets) go through untouched and send no signal."""
    app = Starlette(lifespan=td_starlette.telemetry_lifespan(factory))
    app.add_middleware(td_starlette.TelemetryMiddleware)
    events = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(events)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await asyncio.wait_for(app(scope, receive, send), BOUND)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert app.state.telemetry.closed
    assert emulator.signals == []


async def test_lifespan_refuses_a_factory_that_returns_something_else() -> None:
    """A factory returning anything but a TelemetryClient fails the startup clearly."""
    app = Starlette(lifespan=td_starlette.telemetry_lifespan(not_a_client))
    with pytest.raises(ConfigurationError, match="TelemetryClient"):
        async with app.router.lifespan_context(app):
            pass


async def test_a_raising_client_user_hook_falls_back_to_the_default_user(
    factory: Callable[[], TelemetryClient],
    emulator: IngestEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in client_user= never breaks the response; the client's default user is used."""

    def broken(conn: object) -> str:
        raise KeyError("x-user")

    app = Starlette(routes=[Route("/", ok)], lifespan=td_starlette.telemetry_lifespan(factory))
    app.add_middleware(td_starlette.TelemetryMiddleware, client_user=broken)
    async with asgi(app) as http:
        assert (await http.get("/")).text == "ok"
    (signal,) = request_signals(emulator)
    assert signal["clientUser"] == sha256_hex("web-user")
    assert "client_user hook raised" in caplog.text


async def test_a_closed_client_never_breaks_the_request(
    factory: Callable[[], TelemetryClient], caplog: pytest.LogCaptureFixture
) -> None:
    """When the signal cannot be queued (the client is closed) the response still goes out."""
    td = factory()
    await td.aclose()
    app = Starlette(routes=[Route("/", ok)])
    app.add_middleware(td_starlette.TelemetryMiddleware, client=td)
    async with asgi(app, lifespan=False) as http:
        assert (await http.get("/")).text == "ok"
    assert "could not queue the request signal" in caplog.text


def test_middleware_refuses_a_reserved_signal_type() -> None:
    """A signal type in the reserved TelemetryDeck. namespace fails when the app is set up."""
    with pytest.raises(InvalidSignalError):
        td_starlette.TelemetryMiddleware(Starlette(), signal_type="TelemetryDeck.Request.done")


# ----------------------------------------------------------------------------- aiohttp.web


async def test_cleanup_ctx_starts_the_client_and_closes_it_at_cleanup(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """The client is under TELEMETRY_KEY while the app runs; cleanup flushes and closes it."""

    async def tick(request: web.Request) -> web.Response:
        await request.app[td_aiohttp.TELEMETRY_KEY].signal("Web.Page.viewed")
        return web.Response(text="ok")

    app = web.Application()
    app.cleanup_ctx.append(td_aiohttp.telemetry_ctx(factory))
    app.router.add_get("/tick", tick)
    async with serve(app) as http, http.get("/tick") as response:
        assert response.status == 200
        td = app[td_aiohttp.TELEMETRY_KEY]
        assert emulator.signals == []
    assert td.closed
    assert [s["type"] for s in emulator.signals] == ["Web.Page.viewed"]


async def test_get_telemetry_finds_the_client_from_a_sub_application(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """get_telemetry() looks the client up through the parent app from a sub-app's handler."""

    async def order(request: web.Request) -> web.Response:
        await td_aiohttp.get_telemetry(request).signal("Shop.Order.viewed")
        return web.Response(text="ok")

    shop = web.Application()
    shop.router.add_get("/orders/{order_id}", order)
    app = web.Application()
    app.cleanup_ctx.append(td_aiohttp.telemetry_ctx(factory))
    app.add_subapp("/shop", shop)
    async with serve(app) as http, http.get("/shop/orders/3") as response:
        assert response.status == 200
    assert [s["type"] for s in emulator.signals] == ["Shop.Order.viewed"]


async def test_aiohttp_get_telemetry_without_cleanup_ctx_raises_configuration_error() -> None:
    """A handler asking for the client of an app without telemetry_ctx gets a clear error."""
    errors: list[Exception] = []

    async def handler(request: web.Request) -> web.Response:
        try:
            td_aiohttp.get_telemetry(request)
        except Exception as exc:
            errors.append(exc)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handler)
    async with serve(app) as http, http.get("/"):
        pass
    assert len(errors) == 1
    assert isinstance(errors[0], ConfigurationError)


async def test_aiohttp_middleware_sends_the_canonical_route_of_a_sub_application(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """The route is the resource's canonical template, sub-app prefix included, not the path."""

    async def order(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    shop = web.Application()
    shop.router.add_get("/orders/{order_id}", order)
    app = web.Application(middlewares=[td_aiohttp.telemetry_middleware()])
    app.cleanup_ctx.append(td_aiohttp.telemetry_ctx(factory))
    app.add_subapp("/shop", shop)
    async with serve(app) as http, http.get("/shop/orders/77125") as response:
        assert response.status == 200
    (signal,) = request_signals(emulator)
    assert http_payload(signal) == {
        "HTTP.Request.route": "/shop/orders/{order_id}",
        "HTTP.Request.method": "GET",
        "HTTP.Response.statusClass": "2xx",
    }
    assert signal["floatValue"] >= 0
    assert "77125" not in repr(emulator.batches)


async def test_aiohttp_middleware_counts_an_http_exception_with_its_status(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """A handler raising web.HTTPForbidden is reported as 4xx and still answers 403."""

    async def forbidden(request: web.Request) -> web.Response:
        raise web.HTTPForbidden

    app = web.Application(middlewares=[td_aiohttp.telemetry_middleware()])
    app.cleanup_ctx.append(td_aiohttp.telemetry_ctx(factory))
    app.router.add_get("/admin", forbidden)
    async with serve(app) as http, http.get("/admin") as response:
        assert response.status == 403
    (signal,) = request_signals(emulator)
    assert signal["payload"]["HTTP.Response.statusClass"] == "4xx"


async def test_aiohttp_middleware_reports_5xx_when_the_handler_raises(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """A handler raising an ordinary exception is reported as 5xx; the client gets a 500."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    app = web.Application(middlewares=[td_aiohttp.telemetry_middleware()])
    app.cleanup_ctx.append(td_aiohttp.telemetry_ctx(factory))
    app.router.add_get("/broken", broken)
    async with serve(app) as http, http.get("/broken") as response:
        assert response.status == 500
    (signal,) = request_signals(emulator)
    assert signal["payload"]["HTTP.Response.statusClass"] == "5xx"


async def test_aiohttp_middleware_reports_unmatched_requests_without_their_path(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """A request no route matches is sent as route (unmatched) and 4xx."""
    app = web.Application(middlewares=[td_aiohttp.telemetry_middleware()])
    app.cleanup_ctx.append(td_aiohttp.telemetry_ctx(factory))
    async with serve(app) as http, http.get("/private/token-5521") as response:
        assert response.status == 404
    (signal,) = request_signals(emulator)
    assert signal["payload"]["HTTP.Request.route"] == "(unmatched)"
    assert signal["payload"]["HTTP.Response.statusClass"] == "4xx"
    assert "token-5521" not in repr(emulator.batches)


async def test_aiohttp_middleware_filter_skips_requests(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """Requests the filter refuses send nothing; the others do."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(
        middlewares=[td_aiohttp.telemetry_middleware(filter=lambda i: i.route != "/healthz")]
    )
    app.cleanup_ctx.append(td_aiohttp.telemetry_ctx(factory))
    app.router.add_get("/healthz", handler)
    app.router.add_get("/", handler)
    async with serve(app) as http:
        for path in ("/healthz", "/"):
            async with http.get(path) as response:
                assert response.status == 200
    routes = [s["payload"]["HTTP.Request.route"] for s in request_signals(emulator)]
    assert routes == ["/"]


async def test_a_raising_filter_skips_the_signal_and_serves_the_request(
    factory: Callable[[], TelemetryClient],
    emulator: IngestEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in the filter never breaks the response; it is logged and the signal skipped."""

    def broken(info: object) -> bool:
        raise ValueError("filter bug")

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[td_aiohttp.telemetry_middleware(filter=broken)])
    app.cleanup_ctx.append(td_aiohttp.telemetry_ctx(factory))
    app.router.add_get("/", handler)
    async with serve(app) as http, http.get("/") as response:
        assert await response.text() == "ok"
    assert request_signals(emulator) == []
    assert "filter raised" in caplog.text


async def test_cleanup_ctx_closes_the_client_even_if_a_later_context_fails(
    factory: Callable[[], TelemetryClient],
) -> None:
    """A startup failure after telemetry_ctx still closes the client (no leaked task)."""
    holder: dict[str, TelemetryClient] = {}

    async def failing(app: web.Application) -> AsyncIterator[None]:
        holder["td"] = app[td_aiohttp.TELEMETRY_KEY]
        raise RuntimeError("database down")
        yield  # pragma: no cover

    app = web.Application()
    app.cleanup_ctx.append(td_aiohttp.telemetry_ctx(factory))
    app.cleanup_ctx.append(failing)
    runner = web.AppRunner(app)
    with pytest.raises(RuntimeError, match="database down"):
        await asyncio.wait_for(runner.setup(), BOUND)
    await runner.cleanup()
    assert holder["td"].closed


async def test_aiohttp_middleware_hashes_the_user_from_the_client_user_hook(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """client_user= picks the request's user, which is hashed like any other user id."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    middleware = td_aiohttp.telemetry_middleware(client_user=lambda r: r.headers.get("X-User"))
    app = web.Application(middlewares=[middleware])
    app.cleanup_ctx.append(td_aiohttp.telemetry_ctx(factory))
    app.router.add_get("/", handler)
    async with serve(app) as http, http.get("/", headers={"X-User": "alice"}):
        pass
    (signal,) = request_signals(emulator)
    assert signal["clientUser"] == sha256_hex("alice")


async def test_telemetry_ctx_refuses_a_factory_that_returns_something_else() -> None:
    """A factory returning anything but a TelemetryClient fails the app's startup clearly."""
    app = web.Application()
    app.cleanup_ctx.append(td_aiohttp.telemetry_ctx(not_a_client))
    runner = web.AppRunner(app)
    with pytest.raises(ConfigurationError, match="TelemetryClient"):
        await asyncio.wait_for(runner.setup(), BOUND)
    await runner.cleanup()


async def test_request_payloads_stay_right_and_bounded_across_many_routes(
    factory: Callable[[], TelemetryClient], emulator: IngestEmulator
) -> None:
    """Routes made on the fly: each signal carries its own route and status, memory stays flat."""
    from telemetrydeck_async._http import RequestSignals

    signals = RequestSignals(REQUEST_SIGNAL)
    routes = [f"/generated/{n}" for n in range(4200)]
    async with factory() as td:
        for n, route in enumerate(routes):
            signals.send_request(td, "GET", route, 200 if n % 2 else 404, 1.0, None)
        signals.send_request(td, "POST", routes[0], 500, 1.0, None)  # after the bound: rebuilt
        assert len(signals._payloads) <= 4096
    sent = [http_payload(s) for s in request_signals(emulator)]
    assert [p["HTTP.Request.route"] for p in sent] == [*routes, routes[0]]
    assert [p["HTTP.Response.statusClass"] for p in sent] == [
        *(("2xx" if n % 2 else "4xx") for n in range(4200)),
        "5xx",
    ]
    assert sent[-1]["HTTP.Request.method"] == "POST"
