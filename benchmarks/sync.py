"""The caller cost of ``SyncTelemetryClient.signal()`` (issue 14), beside ``signal_nowait()``.

Each call is timed alone with ``perf_counter_ns`` (the timer's own cost subtracted), from one
plain thread and from 8 threads calling at once into one client; the reference is the async
client's ``signal_nowait()`` on its loop, measured in the same run with the same workload.
Between chunks both clients are flushed outside the timed region, so no queue backs up.
The target: the sync call at most 2x the async caller cost.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time

from telemetrydeck_async import SyncTelemetryClient

from ._common import APP_ID, NAMESPACE, SALT, SESSION_ID, SIGNAL_TYPE, USERS, Row, Sink, percentile
from .figures import Settings, _timer_overhead_ns, client

THREADS = 8


def _sync_client(sink: Sink) -> SyncTelemetryClient:
    return SyncTelemetryClient(
        APP_ID, namespace=NAMESPACE, base_url=sink.base_url, salt=SALT, session_id=SESSION_ID
    )


def _timed_calls(td: SyncTelemetryClient, start: int, stop: int, out: list[int]) -> None:
    ns = time.perf_counter_ns
    users = USERS
    record = out.append
    for i in range(start, stop):
        t0 = ns()
        td.signal(
            SIGNAL_TYPE,
            client_user=users[i & 3],
            payload={"Bench.index": i, "Bench.plan": "pro", "Bench.flag": True},
        )
        t1 = ns()
        record(t1 - t0)


def _threads_at_once(td: SyncTelemetryClient, start: int, stop: int, out: list[int]) -> float:
    """``THREADS`` threads share [start, stop); return the wall time of the whole burst (s)."""
    per = max((stop - start) // THREADS, 1)
    samples: list[list[int]] = [[] for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS + 1)

    def run(n: int) -> None:
        barrier.wait()
        _timed_calls(td, start + n * per, start + (n + 1) * per, samples[n])

    workers = [threading.Thread(target=run, args=(n,)) for n in range(THREADS)]
    for worker in workers:
        worker.start()
    barrier.wait()
    t0 = time.perf_counter()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - t0
    for part in samples:
        out.extend(part)
    return wall


async def sync_caller_cost(s: Settings, sink: Sink) -> list[Row]:
    """µs per call: ``signal_nowait()`` on the loop; sync ``signal()`` from 1 and 8 threads."""
    ns = time.perf_counter_ns
    users = USERS
    overhead = _timer_overhead_ns(20_000)
    nowait: list[int] = []
    one: list[int] = []
    eight: list[int] = []
    walls: list[float] = []
    td_sync = _sync_client(sink)
    async with client(sink) as td:
        for i in range(1_000):  # warm up both: caches, connections, the sync loop thread
            td.signal_nowait(SIGNAL_TYPE, client_user=users[i & 3])
        await asyncio.to_thread(_timed_calls, td_sync, 0, 1_000, [])
        await td.flush()
        await asyncio.to_thread(td_sync.flush)
        gc.collect()
        for start in range(0, s.caller_n, s.caller_chunk):
            stop = min(start + s.caller_chunk, s.caller_n)
            record = nowait.append
            for i in range(start, stop):
                t0 = ns()
                td.signal_nowait(
                    SIGNAL_TYPE,
                    client_user=users[i & 3],
                    payload={"Bench.index": i, "Bench.plan": "pro", "Bench.flag": True},
                )
                t1 = ns()
                record(t1 - t0)
            await td.flush()
            await asyncio.to_thread(_timed_calls, td_sync, start, stop, one)
            await asyncio.to_thread(td_sync.flush)
            walls.append(await asyncio.to_thread(_threads_at_once, td_sync, start, stop, eight))
            await asyncio.to_thread(td_sync.flush)
    result = await asyncio.to_thread(td_sync.close)
    lost = sum(result.dropped.values()) + td_sync.stats.dropped_total

    def us(samples: list[int], q: float) -> float:
        return max(percentile(samples, q) - overhead, 0.0) / 1000

    reference = us(nowait, 50)
    note = f"timer overhead {overhead:.0f} ns subtracted; n={s.caller_n} per variant"
    if lost:
        note += f"; {lost} dropped (must be 0)"
    rows = [
        Row("sync.nowait.median", "async `td.signal_nowait()` on the loop, median", reference,
            "µs", note=note),
    ]  # fmt: skip
    for key, label, samples in (("one", "1 thread", one), ("eight", f"{THREADS} threads", eight)):
        row = Row(
            f"sync.{key}.median",
            f"`SyncTelemetryClient.signal()` from {label}, median",
            us(samples, 50),
            "µs",
            reference,
            "≤ 2x `signal_nowait()`",
        )
        row.met = row.ratio is not None and row.ratio <= 2.0
        rows.append(row)
        rows.append(
            Row(f"sync.{key}.p99", f"`SyncTelemetryClient.signal()` from {label}, p99",
                us(samples, 99), "µs", us(nowait, 99))
        )  # fmt: skip
    total = sum(walls)
    rows.append(
        Row("sync.eight.rate", f"`SyncTelemetryClient.signal()`, {THREADS} threads, all calls",
            len(eight) / total / 1000 if total else None, "k calls/s",
            note="the GIL serialises the callers: this is the client's aggregate intake")
    )  # fmt: skip
    return rows
