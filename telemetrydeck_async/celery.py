"""Celery integration: the client's life follows the worker's. ::

    from celery import Celery
    from telemetrydeck_async import SyncTelemetryClient
    from telemetrydeck_async import celery as td_celery

    app = Celery("tasks")
    td = SyncTelemetryClient("APP-ID", namespace="com.example")
    td_celery.connect(td)

    @app.task
    def export(report_id: int) -> None:
        with td.duration("Report.Export.finished"):
            ...

:func:`connect` wires Celery's worker signals:

* ``worker_process_init`` (each prefork child, after the fork): the client starts its own loop
  there at once, so a spool left by an earlier run is sent and the first task does not wait;
* ``worker_process_shutdown`` (each prefork child, which ends with ``os._exit()`` and so runs
  no exit hook): a bounded close (``close_timeout``) sends or spools what the child queued;
* ``worker_shutdown`` (the main worker process: the solo and threads pools run tasks there):
  the same bounded close.
"""

from __future__ import annotations

import logging
from typing import Any

from ._sync import SyncTelemetryClient

try:
    from celery import signals  # type: ignore[import-not-found,import-untyped,unused-ignore]  # reason: optional, untyped
except ImportError as exc:  # pragma: no cover - exercised only without Celery
    raise ImportError("telemetrydeck_async.celery needs Celery: pip install celery") from exc

__all__ = ["connect"]

log = logging.getLogger("telemetrydeck_async")


def connect(client: SyncTelemetryClient) -> None:
    """Start ``client`` in every worker process and close it, bounded, when each one ends.

    Call it once, where the Celery app is defined (the module every worker imports).
    Idempotent: a second call for the same client adds nothing.
    """

    def process_started(**_: Any) -> None:
        try:
            client.flush(timeout=0)  # starts the loop in this process; sends nothing yet
        except Exception:
            log.warning("could not start the TelemetryClient in a Celery worker", exc_info=True)

    def process_ending(**_: Any) -> None:
        try:
            result = client.close()
        except Exception:
            log.warning("could not close the TelemetryClient in a Celery worker", exc_info=True)
            return
        log.debug("Celery worker process closed its TelemetryClient: %s", result)

    # weak=False: these closures are referenced only by the signals. dispatch_uid: one
    # receiver per client and signal, however often connect() runs.
    uid = f"telemetrydeck-async-{id(client)}"
    signals.worker_process_init.connect(process_started, weak=False, dispatch_uid=uid)
    signals.worker_process_shutdown.connect(process_ending, weak=False, dispatch_uid=uid)
    signals.worker_shutdown.connect(process_ending, weak=False, dispatch_uid=uid)
