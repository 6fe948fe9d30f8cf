"""A Celery app on kombu's filesystem transport (no broker server), for test_celery.py.

``python -m tests.scripts.celery_app send N`` queues N tasks; a worker (``celery -A
tests.scripts.celery_app worker``) runs them, each sending ``Celery.Task.done`` with a unique
``Test.id``. flush_interval is long: the signals leave at the worker's shutdown, by the close
``connect()`` wired. Every worker process prints its books after that close.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from celery import Celery, signals

from telemetrydeck_async import RetryPolicy, SyncTelemetryClient
from telemetrydeck_async import celery as td_celery

folder = Path(os.environ["TD_CELERY_DIR"])
for name in ("queue", "processed"):
    (folder / name).mkdir(parents=True, exist_ok=True)

app = Celery("celery_app", broker="filesystem://")
app.conf.broker_transport_options = {
    "data_folder_in": str(folder / "queue"),
    "data_folder_out": str(folder / "queue"),
    "processed_folder": str(folder / "processed"),
}
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False
app.conf.worker_redirect_stdouts = False  # the BOOKS lines go to the real stdout

td = SyncTelemetryClient(
    "test-app",
    namespace="com.example",
    base_url=os.environ["TD_BASE_URL"],
    default_user="celery-user",
    flush_interval=60,
    retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.3, deadline=30),
)
td_celery.connect(td)
td_celery.connect(td)  # a second call adds nothing


@app.task(name="work")  # the same name whether imported or run as __main__
def work(n: int) -> int:
    td.signal("Celery.Task.done", payload={"Test.id": f"task-{n}"})
    return n


def _books(**_: object) -> None:
    # Connected after connect(): Celery calls receivers in order, so this runs after the close.
    s = td.stats
    dropped = sum(s.dropped.values())
    line = f"BOOKS {os.getpid()} {s.enqueued} {s.sent} {s.spooled} {dropped} {s.pending}\n"
    os.write(1, line.encode())  # one write: worker processes share the pipe


signals.worker_process_shutdown.connect(_books, weak=False)
signals.worker_shutdown.connect(_books, weak=False)

if __name__ == "__main__" and sys.argv[1:2] == ["send"]:
    for n in range(int(sys.argv[2])):
        work.delay(n)
    print("SENT", flush=True)
