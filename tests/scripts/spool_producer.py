"""A child process for crash tests: sends numbered signals through a client with a spool.

Usage: spool_producer.py BASE_URL SPOOL_DIR DURABILITY COUNT CONCURRENCY MAX_QUEUE [PACE]

PACE: seconds each producer sleeps between signals (default 0), so a kill lands mid-stream.

Prints ``ready`` once the client runs, then ``ok <id> <id> ...`` lines with the ids whose
``await td.signal()`` has returned, and ``done`` at the end. The parent kills it with SIGKILL
at a random point and checks which of the printed ids reach the server later.
"""

from __future__ import annotations

import asyncio
import sys

from telemetrydeck_async import RetryPolicy, TelemetryClient


async def main(
    base_url: str,
    spool_dir: str,
    durability: str,
    count: int,
    workers: int,
    queue: int,
    pace: float,
) -> None:
    returned: list[int] = []

    async def report() -> None:
        while True:
            if returned:
                chunk = returned[:1000]  # bounded lines: see the end of main()
                del returned[: len(chunk)]
                sys.stdout.write("ok " + " ".join(map(str, chunk)) + "\n")
                sys.stdout.flush()
            await asyncio.sleep(0.005)

    td = TelemetryClient(
        "crash-app",
        namespace="com.example",
        base_url=base_url,
        default_user="crash-user",
        spool_dir=spool_dir,
        durability=durability,  # type: ignore[arg-type]  # validated by the client
        max_queue_size=queue,
        flush_interval=0.05,
        retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.2, deadline=1.0),
    )
    await td.start()
    reporter = asyncio.ensure_future(report())
    print("ready", flush=True)

    async def produce(first: int) -> None:
        for i in range(first, count, workers):
            await td.signal("Crash.test", payload={"Test.id": i})
            returned.append(i)
            if pace:
                await asyncio.sleep(pace)

    await asyncio.gather(*(produce(w) for w in range(workers)))
    await asyncio.sleep(0.05)
    reporter.cancel()
    # Lines of at most 1,000 ids: the parent reads lines with a bounded buffer, and when the
    # producers never had to wait (nothing made them yield) every id is still here.
    for start in range(0, len(returned), 1000):
        sys.stdout.write("ok " + " ".join(map(str, returned[start : start + 1000])) + "\n")
    print("done", flush=True)
    await td.aclose()


if __name__ == "__main__":
    base, spool, mode, n, c, q = sys.argv[1:7]
    pace = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    asyncio.run(main(base, spool, mode, int(n), int(c), int(q), pace))
