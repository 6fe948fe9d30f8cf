"""The interpreter exits while 4 threads call ``signal_threadsafe()`` on an async client.

argv: BASE_URL MODE. The client runs on a loop in a daemon thread (as in a Django or Flask
app with an async core). Each caller counts the calls that returned (a refused call raises
``ClientClosedError`` and is not counted); once 2,000 returned, the main thread returns with
the callers still calling:

* ``running``: the loop still runs, so the package's exit hook closes the client on it;
* ``stopped``: the loop is stopped first (not closed): hand-overs scheduled on it never run,
  and the exit hook salvages without a loop.

Last (an ``atexit`` handler registered before the package is imported runs after its hooks),
the callers are stopped and ``ACCEPTED n`` and ``BOOKS enqueued sent spooled dropped pending``
are printed.
"""

from __future__ import annotations

import atexit


def _report_at_exit() -> None:
    _stop.set()
    for caller in _callers:
        caller.join(60)
    stats = td.stats
    print("ACCEPTED", sum(_accepted), "ALIVE", sum(c.is_alive() for c in _callers), flush=True)
    print(
        "BOOKS",
        stats.enqueued,
        stats.sent,
        stats.spooled,
        sum(stats.dropped.values()),
        stats.pending,
        flush=True,
    )


atexit.register(_report_at_exit)

import asyncio  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from telemetrydeck_async import ClientClosedError, RetryPolicy, TelemetryClient  # noqa: E402

BASE_URL, MODE = sys.argv[1], sys.argv[2]
CALLERS = 4

td = TelemetryClient(
    "test-app",
    base_url=BASE_URL,
    default_user="u",
    flush_interval=0.05,
    close_timeout=5,
    retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.1, deadline=2),
)
_stop = threading.Event()
_accepted = [0] * CALLERS
_callers: list[threading.Thread] = []


def caller(n: int) -> None:
    while not _stop.is_set():
        try:
            td.signal_threadsafe("App.Race.tick", payload={"Test.id": f"race-{n}"})
        except ClientClosedError:
            return  # refused: not counted, and the caller knows
        _accepted[n] += 1


def main() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(td.start(), loop).result(30)
    _callers.extend(threading.Thread(target=caller, args=(n,), daemon=True) for n in range(4))
    for thread_ in _callers:
        thread_.start()
    deadline = time.monotonic() + 60
    while sum(_accepted) < 2000 and time.monotonic() < deadline:
        time.sleep(0.005)
    if MODE == "stopped":
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
    print("RUNNING", flush=True)


main()
