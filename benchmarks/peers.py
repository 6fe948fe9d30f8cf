"""The peers figure: this SDK, the same-bytes hand-written client and other analytics SDKs,
each sending the same workload to the same loopback sink, in the same run.

Every client sends ``n`` events in a tight loop (the caller never yields, as in a synchronous
handler or a batch job), then is flushed; the sink, in its own process, counts what arrived.
Per client: the caller's cost (the loop's wall time / n), delivered events per second (first
call until the last event reached the sink), CPU time of this process per event (all threads:
the peers send from their own threads) and how many never arrived (dropped). The median of the
rounds is reported; the clients take turns within each round.

The peers (posthog's ``AsyncClient``, segment's ``analytics-python``) come with the ``bench``
extra (``pip install -e '.[bench]'``); without it their rows are skipped, and the reason is
printed. They send to the sink's ``/batch/``-style paths with their default options (queue
bound, batch size, one sending thread or task); what they send is their own wire format, of a
similar size per event.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ._common import (
    ENCODERS,
    SIGNAL_TYPE,
    USERS,
    BaselineSender,
    Row,
    Sink,
    median,
)
from .figures import Settings, client

#: How long the sink may take to see every event after the client's flush returned.
_SETTLE = 30.0


@dataclass
class Outcome:
    """One client's figures for one round."""

    caller_us: float
    rate: float
    cpu_us: float
    dropped: int


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


async def _arrived(sink: Sink, what: str, before: int, n: int, deadline: float) -> int:
    """Poll the sink until ``n`` more arrived, or nothing more arrives, or the deadline."""
    last, still_since = -1, time.perf_counter()
    while True:
        got = await sink.count(what) - before
        now = time.perf_counter()
        if got >= n or now > deadline:
            return got
        if got != last:
            last, still_since = got, now
        elif now - still_since > 2.0:  # nothing new for 2 s: the rest is not coming
            return got
        await asyncio.sleep(0.005)


async def _measure(
    sink: Sink,
    what: str,
    n: int,
    produce: Callable[[], None],
    flush: Callable[[], Awaitable[None]],
) -> Outcome:
    before = await sink.count(what)
    gc.collect()
    cpu0 = _cpu()
    t0 = time.perf_counter()
    produce()
    t1 = time.perf_counter()
    await flush()
    got = await _arrived(sink, what, before, n, time.perf_counter() + _SETTLE)
    elapsed = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    return Outcome((t1 - t0) / n * 1e6, got / elapsed, cpu / n * 1e6, n - got)


def _props(i: int) -> dict[str, Any]:
    return {"Bench.index": i, "Bench.plan": "pro", "Bench.flag": True}


async def _sdk_nowait(sink: Sink, n: int) -> Outcome:
    async with client(sink) as td:
        td.signal_nowait(SIGNAL_TYPE, client_user=USERS[0], payload=_props(0))
        await td.flush()  # the connection is warm

        def produce() -> None:
            for i in range(n):
                td.signal_nowait(SIGNAL_TYPE, client_user=USERS[i & 3], payload=_props(i))

        return await _measure(sink, "signals", n, produce, td.flush)


async def _sdk_await(sink: Sink, n: int) -> Outcome:
    # `await td.signal()` yields to the loop only when it must wait for room: it cannot be
    # produced from a synchronous function, so it is timed here with the same clocks.
    async with client(sink) as td:
        await td.signal(SIGNAL_TYPE, client_user=USERS[0], payload=_props(0))
        await td.flush()
        before = await sink.count()
        gc.collect()
        cpu0 = _cpu()
        t0 = time.perf_counter()
        for i in range(n):
            await td.signal(SIGNAL_TYPE, client_user=USERS[i & 3], payload=_props(i))
        t1 = time.perf_counter()
        await td.flush()
        got = await _arrived(sink, "signals", before, n, time.perf_counter() + _SETTLE)
        elapsed = time.perf_counter() - t0
        cpu = _cpu() - cpu0
    return Outcome((t1 - t0) / n * 1e6, got / elapsed, cpu / n * 1e6, n - got)


async def _hand_written(sink: Sink, n: int, encoder: str) -> Outcome:
    async with BaselineSender(
        sink.ingest_url, batch=100, encoder=encoder, same_bytes=True
    ) as sender:
        await sender.produce(0, 100)
        await sender.drain()
        before = await sink.count()
        gc.collect()
        cpu0 = _cpu()
        t0 = time.perf_counter()
        # The hand-written client hands a full batch to a task without waiting for it: the
        # loop below never yields, like the SDK's signal_nowait() loop.
        build = sender.build
        batches: list[list[dict[str, Any]]] = []
        buffer: list[dict[str, Any]] = []
        for i in range(n):
            buffer.append(build(i))
            if len(buffer) >= 100:
                batches.append(buffer)
                buffer = []
        t1 = time.perf_counter()
        for batch in [*batches, buffer]:
            sender.buffer = batch
            await sender.send_buffer()
        await sender.drain()
        got = await _arrived(sink, "signals", before, n, time.perf_counter() + _SETTLE)
        elapsed = time.perf_counter() - t0
        cpu = _cpu() - cpu0
    return Outcome((t1 - t0) / n * 1e6, got / elapsed, cpu / n * 1e6, n - got)


async def _posthog(sink: Sink, n: int) -> Outcome:
    from posthog.async_client import AsyncClient

    ph = AsyncClient("phc_bench", host=sink.base_url)
    # It sets its logger to WARNING and logs every event it drops (a full queue): quiet it.
    logging.getLogger("posthog").setLevel(logging.CRITICAL)
    try:
        ph.capture(SIGNAL_TYPE, distinct_id=USERS[0], properties=_props(0))
        await ph.flush()

        def produce() -> None:
            for i in range(n):
                ph.capture(SIGNAL_TYPE, distinct_id=USERS[i & 3], properties=_props(i))

        async def flush() -> None:
            await ph.flush(timeout_seconds=_SETTLE)

        return await _measure(sink, "events", n, produce, flush)
    finally:
        await ph.shutdown()


async def _segment(sink: Sink, n: int) -> Outcome:
    from segment.analytics import Client

    sc = Client(write_key="bench", host=sink.base_url)
    try:
        sc.track(user_id=USERS[0], event=SIGNAL_TYPE, properties=_props(0))
        await asyncio.to_thread(sc.flush)

        def produce() -> None:
            for i in range(n):
                sc.track(user_id=USERS[i & 3], event=SIGNAL_TYPE, properties=_props(i))

        async def flush() -> None:
            await asyncio.to_thread(sc.flush)

        return await _measure(sink, "events", n, produce, flush)
    finally:
        await asyncio.to_thread(sc.shutdown)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def contenders() -> tuple[
    list[tuple[str, str, Callable[[Sink, int], Awaitable[Outcome]]]], list[str]
]:
    """(key, label, run) of every client that can run here, and why others cannot."""
    fastest = "orjson" if "orjson" in ENCODERS else "stdlib"
    runs: list[tuple[str, str, Callable[[Sink, int], Awaitable[Outcome]]]] = [
        (
            "hand",
            f"hand-written, same bytes ({fastest})",
            lambda sink, n: _hand_written(sink, n, fastest),
        ),
        ("sdk.await", "this SDK, `await td.signal()`", _sdk_await),
        ("sdk.nowait", "this SDK, `td.signal_nowait()`", _sdk_nowait),
    ]
    skipped: list[str] = []
    if "orjson" in ENCODERS:
        runs.insert(
            1,
            (
                "hand.stdlib",
                "hand-written, same bytes (stdlib json)",
                lambda sink, n: _hand_written(sink, n, "stdlib"),
            ),
        )
    else:
        skipped.append("orjson is not installed: the hand-written client uses the stdlib json")
    if _installed("posthog") and _installed("httpx"):
        runs.append(("posthog", "posthog `AsyncClient.capture()`", _posthog))
    else:
        skipped.append("posthog (and httpx) not installed: pip install -e '.[bench]'")
    if _installed("segment.analytics"):
        runs.append(("segment", "segment-analytics-python `track()`", _segment))
    else:
        skipped.append("segment-analytics-python not installed: pip install -e '.[bench]'")
    return runs, skipped


async def peers(s: Settings, sink: Sink) -> list[Row]:
    """Caller cost, delivered/s, CPU per event and drops of every client, same workload."""
    n = s.peers_n
    runs, skipped = contenders()
    for reason in skipped:
        print(f"    peers: skipped: {reason}", file=sys.stderr, flush=True)
    # The peers log every dropped event (a full queue): keep the report readable.
    for name in ("posthog", "segment", "analytics"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    got: dict[str, list[Outcome]] = {key: [] for key, _, _ in runs}
    for _ in range(s.peer_rounds):
        for key, _label, run in runs:
            got[key].append(await run(sink, n))
    hand = got["hand"]
    rows: list[Row] = []
    for key, label, _run in runs:
        outcomes = got[key]
        caller = median([o.caller_us for o in outcomes])
        rate = median([o.rate for o in outcomes])
        cpu = median([o.cpu_us for o in outcomes])
        dropped = median([float(o.dropped) for o in outcomes])
        rows.append(
            Row(
                f"peers.{key}",
                f"{label}: caller µs per call",
                caller,
                "µs",
                median([o.caller_us for o in hand]),
                note=f"n={n}, median of {len(outcomes)} rounds; delivered {rate:,.0f}/s, CPU "
                f"{cpu:.1f} µs per event (all threads), dropped {dropped:,.0f}",
                extra={
                    "label": label,
                    "caller_us": caller,
                    "rate": rate,
                    "cpu_us": cpu,
                    "dropped": dropped,
                    "rounds": [o.__dict__ for o in outcomes],
                },
            )
        )
    if skipped:
        rows[-1].note += "; skipped: " + "; ".join(skipped)
    return rows
