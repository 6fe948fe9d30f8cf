"""A Starlette app for gunicorn --preload: the client is made, and used, in the master.

The master queues one ``Master.Preload.done`` signal on a short-lived loop and never closes
the client: every worker inherits that queue through fork() and must neither send it nor
fail to start. Each response is the worker's pid.
"""

import asyncio
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from telemetrydeck_async import TelemetryClient
from telemetrydeck_async.starlette import TelemetryMiddleware, telemetry_lifespan

td = TelemetryClient(
    "test-app",
    namespace="com.example",
    base_url=os.environ["TD_BASE_URL"],
    default_user="web-user",
    flush_interval=60,
)


async def _preload() -> None:
    await td.signal("Master.Preload.done")


asyncio.run(_preload())
print("MASTER-SESSION", td.session_id, flush=True)


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(os.getpid()))


app = Starlette(routes=[Route("/hello/{name}", hello)], lifespan=telemetry_lifespan(td))
app.add_middleware(TelemetryMiddleware)
