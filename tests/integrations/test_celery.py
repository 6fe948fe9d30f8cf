"""Celery: connect() with a real worker process on kombu's filesystem transport (no broker).

Tasks queue signals with a long flush interval; the worker is stopped with SIGTERM (a warm
shutdown), and the close wired by connect() must deliver every task's signal: from each
prefork child (worker_process_shutdown) and from the main process of the solo and threads pools
(worker_shutdown).
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from telemetrydeck_async.devserver import IngestEmulator
from tests import _proc

pytest.importorskip("celery")

TASKS = 30
BOUND = 90.0


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
async def test_a_stopped_worker_delivers_every_tasks_signal(
    emulator: IngestEmulator, procs: list[_proc.Proc], tmp_path: Path, pool: str
) -> None:
    """SIGTERM to the worker: every task's signal arrives once; every process's books balance."""
    env = _proc.script_env(TD_BASE_URL=emulator.base_url, TD_CELERY_DIR=str(tmp_path))
    sender = await _proc.start("-m", "tests.scripts.celery_app", "send", str(TASKS), env=env)
    procs.append(sender)
    assert await sender.finish(BOUND) == 0, sender.output
    concurrency = ["--concurrency", "2"] if pool != "solo" else []
    worker = await _proc.start(
        "-m", "celery", "-A", "tests.scripts.celery_app", "worker", "--pool", pool,
        *concurrency, "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        "--without-heartbeat",
        env=env,
    )  # fmt: skip
    procs.append(worker)
    for n in range(TASKS):
        await worker.wait_for(rf"Task work\[.*\] succeeded.*: {n}$",
                              stream="err", timeout=BOUND)  # fmt: skip
    assert emulator.signals == []  # still queued in the workers (flush_interval=60)
    worker.send_signal(signal.SIGTERM)
    assert await worker.finish(BOUND) == 0, worker.output
    assert emulator.distinct_ids() == {f"task-{n}" for n in range(TASKS)}
    assert emulator.duplicates() == 0
    books = [
        tuple(int(x) for x in m.groups())
        for line in worker.out
        if (m := re.fullmatch(r"BOOKS (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", line))
    ]
    assert books, worker.output
    for _pid, enqueued, sent, spooled, dropped, pending in books:
        assert enqueued == sent + spooled + dropped + pending
    assert sum(b[2] for b in books) == TASKS, worker.output
