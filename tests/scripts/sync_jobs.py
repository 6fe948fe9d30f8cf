"""Short-lived programs using SyncTelemetryClient, run in real processes by test_sync_jobs.py.

argv: MODE BASE_URL [SPOOL_DIR|-]. Every mode prints ``BOOKS enqueued sent spooled dropped
pending`` lines the test checks, and tags each signal with a unique ``Test.id``.

* ``unclosed``: 40 signals, then the script ends without ``close()``: the exit hook must send
  them (or spool them when the endpoint is down), bounded by ``close_timeout``.
* ``pool``: a ``multiprocessing`` fork pool of 4, each task sending from its worker; the
  parent used the client before forking (its signals are its own).
* ``lambda``: a handler invoked 50 times under ``flush_after``; after every invocation the
  client has nothing pending.
* ``always``: durability="always": 30 signals, ``WRITTEN``, then the process waits to be
  killed with SIGKILL (the test does it).
* ``racing``: 4 daemon threads call ``signal()`` in a tight loop; the main thread returns
  while they run, so the exit hook closes the client with calls in flight. Last, the callers
  are stopped and ``ACCEPTED n`` (calls that returned) is printed beside the books.
"""

from __future__ import annotations

import atexit


def _report_at_exit() -> None:
    # Registered before the package is imported, so it runs after the package's exit hooks
    # (atexit runs handlers last-in, first-out): it prints the books as they left them.
    if MODE == "racing":
        _stop.set()
        for caller in _callers:
            caller.join(60)
        print("ACCEPTED", sum(_accepted), "ALIVE", sum(c.is_alive() for c in _callers), flush=True)
    if MODE in ("unclosed", "racing"):
        books("exit", td.stats)


atexit.register(_report_at_exit)

import multiprocessing  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from telemetrydeck_async import (  # noqa: E402
    ClientClosedError,
    RetryPolicy,
    Stats,
    SyncTelemetryClient,
)

MODE, BASE_URL = sys.argv[1], sys.argv[2]
SPOOL_DIR = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None


def books(label: str, stats: Stats) -> None:
    dropped = sum(stats.dropped.values())
    print(
        f"BOOKS {label} {stats.enqueued} {stats.sent} {stats.spooled} {dropped} {stats.pending}",
        flush=True,
    )


td = SyncTelemetryClient(
    "test-app",
    namespace="com.example",
    base_url=BASE_URL,
    default_user="job-user",
    flush_interval=60,
    close_timeout=3,
    retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.2, deadline=30),
    spool_dir=SPOOL_DIR,
    durability="always" if MODE == "always" else "spill",
)


_reported: list[int] = []
# Inherited by the pool's forked workers: each of the 4 tasks waits for the others, so every
# worker runs exactly one.
_all_workers = multiprocessing.get_context("fork").Barrier(4)


def pool_task(n: int) -> int:
    if not _reported:  # once per worker: its books, after the client's own finalizer closed it
        import multiprocessing.util

        _reported.append(n)
        multiprocessing.util.Finalize(None, lambda: books("worker", td.stats), exitpriority=5)
    _all_workers.wait(60)
    for i in range(50):
        td.signal("Job.Pool.tick", payload={"Test.id": f"pool-{n}-{i}"})
    return os.getpid()


_stop = threading.Event()
_accepted = [0] * 4
_callers: list[threading.Thread] = []


def racing_caller(n: int) -> None:
    while not _stop.is_set():
        try:
            td.signal("Job.Race.tick", payload={"Test.id": f"race-{n}"})
        except ClientClosedError:
            return  # refused: the client is closed, and this call was not counted
        _accepted[n] += 1


def main() -> None:
    if MODE == "racing":
        _callers.extend(
            threading.Thread(target=racing_caller, args=(n,), daemon=True) for n in range(4)
        )
        for caller in _callers:
            caller.start()
        deadline = time.monotonic() + 60
        while sum(_accepted) < 2000 and time.monotonic() < deadline:
            time.sleep(0.005)
        print("RUNNING", flush=True)
        return  # the interpreter exits with the callers still calling
    if MODE == "unclosed":
        for i in range(40):
            td.signal("Job.Cron.tick", payload={"Test.id": f"cron-{i}"})
        print("QUEUED", flush=True)
        return
    if MODE == "pool":
        td.signal("Job.Parent.started", payload={"Test.id": "parent-0"})
        with multiprocessing.get_context("fork").Pool(4) as pool:
            pids = pool.map(pool_task, range(4), chunksize=1)
            pool.close()
            pool.join()
        print("WORKERS", len(set(pids)), flush=True)
        td.close()
        books("parent", td.stats)
        return
    if MODE == "lambda":

        @td.flush_after
        def handler(event: dict[str, int], context: object) -> int:
            td.signal("Job.Lambda.invoked", payload={"Test.id": f"lambda-{event['n']}"})
            return event["n"]

        for n in range(50):
            assert handler({"n": n}, None) == n
            stats = td.stats
            if stats.pending:
                print("PENDING-AFTER", n, stats.pending, flush=True)
        books("lambda", td.stats)
        td.close()
        return
    if MODE == "always":
        for i in range(30):
            td.signal("Job.Durable.tick", payload={"Test.id": f"durable-{i}"})
        print("WRITTEN", flush=True)
        time.sleep(120)  # killed by the test long before
        return
    raise SystemExit(f"unknown mode {MODE!r}")


if __name__ == "__main__":
    main()
