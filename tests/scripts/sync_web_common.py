"""Shared by the gunicorn test apps (wsgi_app.py, django_app.py): options and books at exit.

Imported first by each app, before telemetrydeck_async: its exit hook is registered earlier, so
it runs later (atexit is last-in, first-out) and prints the books as the client's close left
them, in every process (the gunicorn master and each worker).
"""

from __future__ import annotations

import atexit
import os
from typing import Any

#: The client whose books are printed at exit (set by the app).
clients: list[Any] = []


def _books() -> None:
    for td in clients:
        s = td.stats
        dropped = sum(s.dropped.values())
        line = f"BOOKS {os.getpid()} {s.enqueued} {s.sent} {s.spooled} {dropped} {s.pending}\n"
        # One write() of the whole line: the workers share the pipe, and print() may write the
        # text and its newline separately, so two workers' lines could run together.
        os.write(1, line.encode())


atexit.register(_books)


def options() -> dict[str, Any]:
    """SyncTelemetryClient options from the test's environment."""
    from telemetrydeck_async import RetryPolicy

    return {
        "app_id": "test-app",
        "namespace": "com.example",
        "base_url": os.environ["TD_BASE_URL"],
        "default_user": "web-user",
        "flush_interval": 0.2,
        "close_timeout": 8,
        "retry": RetryPolicy(initial_backoff=0.05, max_backoff=0.3, deadline=60),
        "spool_dir": os.environ.get("TD_SPOOL_DIR") or None,
        # With a spool, every signal is written ahead: the write-ahead path under gunicorn.
        "durability": "always" if os.environ.get("TD_SPOOL_DIR") else "spill",
    }
