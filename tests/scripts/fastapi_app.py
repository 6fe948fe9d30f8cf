"""A FastAPI app using the Starlette integration; run by uvicorn (TD_BASE_URL in the env)."""

import os
from typing import Annotated

from fastapi import Depends, FastAPI

from telemetrydeck_async import TelemetryClient
from telemetrydeck_async.starlette import TelemetryMiddleware, get_telemetry, telemetry_lifespan


def make_client() -> TelemetryClient:
    return TelemetryClient(
        "test-app",
        namespace="com.example",
        base_url=os.environ["TD_BASE_URL"],
        default_user="web-user",
        flush_interval=60,  # nothing leaves before shutdown: the close must deliver it all
    )


app = FastAPI(lifespan=telemetry_lifespan(make_client))
app.add_middleware(TelemetryMiddleware, filter=lambda info: info.route != "/healthz")

Telemetry = Annotated[TelemetryClient, Depends(get_telemetry)]


@app.get("/items/{item_id}")
async def read_item(item_id: int, td: Telemetry) -> dict[str, int]:
    await td.signal("Items.Item.viewed", payload={"Test.id": item_id})
    return {"item_id": item_id}


@app.get("/healthz")
async def healthz() -> dict[str, bool]:
    return {"ok": True}
