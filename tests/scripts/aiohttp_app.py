"""An aiohttp.web app using the integration, with a sub-application; run_app on a port-0 socket.

argv: BASE_URL [SPOOL_DIR]. Prints LISTENING <port> once the socket listens. With a spool,
the close budget is short: the test's endpoint is down and the spool is where signals go.
"""

import socket
import sys

from aiohttp import web

from telemetrydeck_async import TelemetryClient
from telemetrydeck_async.aiohttp_web import get_telemetry, telemetry_ctx, telemetry_middleware


def make_client() -> TelemetryClient:
    return TelemetryClient(
        "test-app",
        namespace="com.example",
        base_url=sys.argv[1],
        default_user="web-user",
        flush_interval=60,  # nothing leaves before shutdown: the cleanup must deliver it all
        spool_dir=sys.argv[2] if len(sys.argv) > 2 else None,
        close_timeout=1.0 if len(sys.argv) > 2 else 10.0,
    )


async def order(request: web.Request) -> web.Response:
    order_id = int(request.match_info["order_id"])
    await get_telemetry(request).signal("Shop.Order.viewed", payload={"Test.id": order_id})
    return web.json_response({"order_id": order_id})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


shop = web.Application()
shop.router.add_get("/orders/{order_id}", order)

app = web.Application(
    middlewares=[telemetry_middleware(filter=lambda info: info.route != "/healthz")]
)
app.cleanup_ctx.append(telemetry_ctx(make_client))
app.router.add_get("/healthz", healthz)
app.add_subapp("/shop", shop)

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
# Listen before saying so: connections then wait in the backlog until run_app accepts them,
# instead of being refused while the app is still starting.
sock.listen(128)
print("LISTENING", sock.getsockname()[1], flush=True)
web.run_app(app, sock=sock, print=None, access_log=None)
