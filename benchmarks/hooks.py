"""What ``before_send`` costs a caller: a no-op hook against no hook, in the same run.

Two clients aimed at the sink, identical but for ``before_send=lambda s: s``; chunks of
``signal_nowait()`` calls alternate between them, each chunk timed as a whole (so the timer's
own cost is spread over the chunk), and the client is flushed between chunks outside the
timed region. Chunks are timed in this process's CPU time. The figure is the median
per-call difference between neighbouring chunks; the target is the issue's.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from ._common import SIGNAL_TYPE, USERS, Row, Sink, median
from .figures import Settings, client


def _noop(signal: dict[str, Any]) -> dict[str, Any]:
    return signal


async def hook_cost(s: Settings, sink: Sink) -> list[Row]:
    """µs per call added by a no-op ``before_send``, and the hook-less call it is added to."""
    # CPU time of this process: the calls never wait (no await inside a chunk), so it is their
    # cost, without the time a shared machine gives other processes meanwhile.
    ns = time.process_time_ns
    chunk = s.caller_chunk
    plain_chunks: list[float] = []
    hooked_chunks: list[float] = []
    payload = {"Bench.plan": "pro", "Bench.flag": True}
    async with client(sink) as plain, client(sink, before_send=_noop) as hooked:
        for td in (plain, hooked):  # warm up: first-call caches, the connection
            for i in range(chunk):
                td.signal_nowait(SIGNAL_TYPE, client_user=USERS[i & 3], payload=payload)
            await td.flush()
        gc.collect()
        for _ in range(max(s.caller_n // chunk, 3)):
            for td, out in ((plain, plain_chunks), (hooked, hooked_chunks)):
                send = td.signal_nowait
                t0 = ns()
                for i in range(chunk):
                    send(SIGNAL_TYPE, client_user=USERS[i & 3], payload=payload)
                out.append((ns() - t0) / chunk / 1000)
                await td.flush()
        dropped = plain.stats.dropped_total + hooked.stats.dropped_total
    base = median(plain_chunks)
    added = median([h - p for h, p in zip(hooked_chunks, plain_chunks, strict=True)])
    note = f"{len(plain_chunks)} chunks of {chunk} calls each; dropped {dropped}"
    cost = Row(
        "hooks.before_send.noop",
        "`before_send` no-op hook, added per call",
        added,
        "µs",
        None,
        "≤ 0.3 µs",
        note=note,
    )
    cost.met = added <= 0.3
    return [
        cost,
        Row(
            "hooks.before_send.none",
            "`td.signal_nowait()` without a hook (the same run)",
            base,
            "µs",
            note="the reference the row above adds to",
        ),
    ]
