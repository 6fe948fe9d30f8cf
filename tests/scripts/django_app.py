"""A one-file Django project for gunicorn --preload, configured by a TELEMETRYDECK setting.

GET /hello/<id>/ signals ``Web.Hello.served`` with ``Test.id`` = id through get_telemetry();
TelemetryMiddleware adds one request signal per request.
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
    TELEMETRYDECK=sync_web_common.options(),
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402  # after setup()

from telemetrydeck_async.django import get_telemetry  # noqa: E402


def hello(request: HttpRequest, name: str) -> HttpResponse:
    get_telemetry().signal("Web.Hello.served", payload={"Test.id": name})
    return HttpResponse(name)


urlpatterns = [path("hello/<str:name>/", hello)]
application = get_wsgi_application()
td = get_telemetry()
sync_web_common.clients.append(td)
td.signal("Master.Preload.done", payload={"Test.id": "master"})
