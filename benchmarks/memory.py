"""Figure 4: memory with N signals queued and the endpoint down, each side in a fresh process.

Bytes per queued signal come from ``tracemalloc`` (traced Python allocations after minus before,
divided by N, after a full collection); peak RSS comes from ``resource.getrusage`` in a separate
process without ``tracemalloc`` (whose own bookkeeping would inflate it). The endpoint is a
loopback port nothing listens on, with a long flush interval and long retry waits, so the
signals stay queued.

Worker usage: ``python -m benchmarks.memory --side client|baseline --n N [--trace]``; it prints
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

from ._common import (
    APP_ID,
    NAMESPACE,
    ROOT,
    SALT,
    SESSION_ID,
    SIGNAL_TYPE,
    USERS,
    Row,
    child_env,
    closed_loopback_port,
    payload,
    wire_dict,
)


def _rss_kib() -> int:
    """The current resident set size in KiB (Linux), or 0 when unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _peak_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere


async def _queue_client(n: int, trace: bool) -> dict[str, Any]:
    from telemetrydeck_async import RetryPolicy, TelemetryClient

    td = TelemetryClient(
        APP_ID,
        namespace=NAMESPACE,
        base_url=f"http://127.0.0.1:{closed_loopback_port()}",
        salt=SALT,
        session_id=SESSION_ID,
        max_queue_size=n * 2,
        flush_interval=3600.0,
        retry=RetryPolicy(initial_backoff=600.0, max_backoff=600.0, deadline=3600.0),
    )
    await td.start()
    td.signal_nowait(SIGNAL_TYPE, client_user=USERS[0], payload=payload(0))
    await asyncio.sleep(0.2)  # let the first request fail: from here the flusher waits
    gc.collect()
    rss_before = _rss_kib()
    if trace:
        tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        td.signal_nowait(SIGNAL_TYPE, client_user=USERS[i & 3], payload=payload(i))
        if i % 1_000 == 0:
            await asyncio.sleep(0)  # let the flusher see the queue, as it would in a service
    await asyncio.sleep(0.1)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - traced_before
    tracemalloc.stop()
    stats = td.stats
    out = {
        "traced_bytes": traced,
        "rss_before_kib": rss_before,
        "peak_rss_kib": _peak_rss_kib(),
        "pending": stats.pending,
        "dropped": stats.dropped_total,
    }
    await td.aclose(timeout=0.5)
    return out


async def _outage(n: int, trace: bool) -> dict[str, Any]:
    """Default queue bound, endpoint down: RSS once the queue is full, and after n more signals."""
    import logging

    from telemetrydeck_async import RetryPolicy, TelemetryClient

    logging.getLogger("telemetrydeck_async").setLevel(logging.ERROR)  # the drops are expected
    td = TelemetryClient(
        APP_ID,
        namespace=NAMESPACE,
        base_url=f"http://127.0.0.1:{closed_loopback_port()}",
        salt=SALT,
        session_id=SESSION_ID,
        retry=RetryPolicy(initial_backoff=600.0, max_backoff=600.0, deadline=3600.0),
    )
    await td.start()
    bound = td.config.max_queue_size
    for i in range(bound + 1_000):
        td.signal_nowait(SIGNAL_TYPE, client_user=USERS[i & 3], payload=payload(i))
        if i % 1_000 == 0:
            await asyncio.sleep(0)
    gc.collect()
    full = _rss_kib()
    for i in range(n):
        td.signal_nowait(SIGNAL_TYPE, client_user=USERS[i & 3], payload=payload(i))
        if i % 1_000 == 0:
            await asyncio.sleep(0)
    gc.collect()
    out = {
        "rss_full_kib": full,
        "rss_after_kib": _rss_kib(),
        "bound": bound,
        "dropped": td.stats.dropped_total,
        "pending": td.stats.pending,
    }
    await td.aclose(timeout=0.5)
    return out


async def _queue_baseline(n: int, trace: bool) -> dict[str, Any]:
    gc.collect()
    rss_before = _rss_kib()
    if trace:
        tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    buffer: list[dict[str, Any]] = []
    for i in range(n):
        buffer.append(wire_dict(i))
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - traced_before
    tracemalloc.stop()
    return {
        "traced_bytes": traced,
        "rss_before_kib": rss_before,
        "peak_rss_kib": _peak_rss_kib(),
        "pending": len(buffer),
        "dropped": 0,
    }


def worker() -> None:
    """Entry point of the worker process."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=("client", "baseline", "outage"), required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    run = {"client": _queue_client, "baseline": _queue_baseline, "outage": _outage}[args.side]
    print(json.dumps(asyncio.run(run(args.n, args.trace))))


async def _spawn(side: str, n: int, trace: bool) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.memory", "--side", side, "--n", str(n)]
    if trace:
        argv.append("--trace")
    proc = await asyncio.to_thread(
        subprocess.run, argv, cwd=ROOT, env=child_env(), capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed: {proc.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


async def memory(n: int) -> list[Row]:
    """Bytes per queued signal and peak RSS, client vs a list of wire dicts."""
    client_trace = await _spawn("client", n, trace=True)
    base_trace = await _spawn("baseline", n, trace=True)
    client_rss = await _spawn("client", n, trace=False)
    base_rss = await _spawn("baseline", n, trace=False)
    per = Row(
        "memory.bytes_per_signal",
        f"bytes per queued signal ({n:,} queued, endpoint down)",
        client_trace["traced_bytes"] / n,
        "B",
        base_trace["traced_bytes"] / n,
        "≤ 1024 B",
        note=f"tracemalloc; {client_trace['pending']} pending, "
        f"{client_trace['dropped']} dropped; baseline: list of wire dicts",
    )
    per.met = per.value is not None and per.value <= 1024
    growth = (client_rss["peak_rss_kib"] - client_rss["rss_before_kib"]) / 1024
    base_growth = (base_rss["peak_rss_kib"] - base_rss["rss_before_kib"]) / 1024
    peak = Row(
        "memory.peak_rss",
        f"peak RSS with {n:,} queued",
        client_rss["peak_rss_kib"] / 1024,
        "MiB",
        base_rss["peak_rss_kib"] / 1024,
        note=f"growth while queueing {growth:.1f} MiB (baseline {base_growth:.1f} MiB); "
        "each side in a fresh process",
        extra={"growth_mib": growth, "baseline_growth_mib": base_growth},
    )
    outage = await _spawn("outage", n, trace=False)
    flat = Row(
        "memory.outage_growth",
        f"RSS growth over {n:,} more signals once the default queue is full (endpoint down)",
        (outage["rss_after_kib"] - outage["rss_full_kib"]) / 1024,
        "MiB",
        None,
        "flat",
        note=f"queue bound {outage['bound']:,}, {outage['dropped']:,} dropped (queue_full), "
        f"{outage['pending']:,} pending; RSS at full queue {outage['rss_full_kib'] / 1024:.1f} MiB",
    )
    flat.met = flat.value is not None and flat.value < 2.0
    return [per, peak, flat]


if __name__ == "__main__":
    worker()
