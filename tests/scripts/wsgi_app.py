"""A Flask app for gunicorn --preload: the client is made, and used, in the master.

GET /hello/<id> signals ``Web.Hello.served`` with ``Test.id`` = id; the middleware adds one
request signal per request. The master signals ``Master.Preload.done`` at import.
"""

# ruff: noqa: I001  # sync_web_common is imported first on purpose (its docstring says why)
from __future__ import annotations

from tests.scripts import sync_web_common  # first: see its docstring

from flask import Flask

from telemetrydeck_async import SyncTelemetryClient
from telemetrydeck_async.wsgi import TelemetryMiddleware

options = sync_web_common.options()
td = SyncTelemetryClient(options.pop("app_id"), **options)
sync_web_common.clients.append(td)
td.signal("Master.Preload.done", payload={"Test.id": "master"})

app = Flask(__name__)
app.wsgi_app = TelemetryMiddleware(app.wsgi_app, td)  # type: ignore[method-assign]


@app.get("/hello/<name>")
def hello(name: str) -> str:
    td.signal("Web.Hello.served", payload={"Test.id": name})
    return name
