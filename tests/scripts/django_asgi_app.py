"""A one-file Django ASGI project for uvicorn, wrapped by ``with_lifespan``.

GET /hello/<id>/ signals ``Web.Hello.served`` with ``Test.id`` = id through get_telemetry();
TelemetryMiddleware adds one request signal per request. ``flush_interval`` is long, so the
signals are still queued when the server gets SIGTERM: only the lifespan's close sends them.
"""

# ruff: noqa: I001  # sync_web_common is imported first on purpose (its docstring says why)
from __future__ import annotations

from tests.scripts import sync_web_common  # first: see its docstring

import django
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import path

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="test-only",
    MIDDLEWARE=["telemetrydeck_async.django.TelemetryMiddleware"],
    TELEMETRYDECK={**sync_web_common.options(), "flush_interval": 600.0},
)
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402  # after setup()

from telemetrydeck_async.django import get_telemetry, with_lifespan  # noqa: E402


def hello(request: HttpRequest, name: str) -> HttpResponse:
    td = get_telemetry()
    if td not in sync_web_common.clients:
        sync_web_common.clients.append(td)
    td.signal("Web.Hello.served", payload={"Test.id": name})
    return HttpResponse(name)


urlpatterns = [path("hello/<str:name>/", hello)]
application = with_lifespan(get_asgi_application())
