"""Figure 6: the on-disk spool, driven directly through ``open_spool`` (not through the client).

* ``spill``: one appender writes batches of 100 records (what the flusher spills per failed
  batch), pending (``claimed=False``);
* ``always``: 8 concurrent appenders write batches of 100 records, claimed (write-ahead);
* recovery: ``claim(500)`` then ``ack(ids)`` until the spool is empty (the sending is measured
  by the throughput figure, not here);
* the loop-stall probe runs during the ``spill`` writes.

Baseline: the same bytes appended, length-prefixed, to one plain file in a worker thread (and
``fsync`` per batch for ``always``), then read back and split for recovery.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from ._common import GcWatch, LoopProbe, Row, percentile, wire_dict

BATCH = 100
APPENDERS = 8
CLAIM = 500


def _spool_api() -> tuple[Any, Any] | None:
    """(open_spool, SpoolRecord) when the spool module exists, else None."""
    try:
        module = importlib.import_module("telemetrydeck_async._spool")
    except ImportError:
        return None
    open_spool = getattr(module, "open_spool", None)
    record = getattr(module, "SpoolRecord", None)
    if open_spool is None or record is None:
        return None
    return open_spool, record


def _client_uses_spool() -> bool:
    client = importlib.import_module("telemetrydeck_async._client")
    return any(name in vars(client) for name in ("open_spool", "Spool"))


def _bodies(n: int) -> list[tuple[float, bytes]]:
    now = time.time()
    return [
        (now, json.dumps(wire_dict(i), separators=(",", ":"), ensure_ascii=False).encode())
        for i in range(n)
    ]


# ----------------------------------------------------------------------------- baseline


class _FileLog:
    """The hand-written baseline: length-prefixed records appended to one file."""

    def __init__(self, path: Path, fsync: bool) -> None:
        self._file = path.open("ab")
        self._fsync = fsync

    def write(self, chunk: list[tuple[float, bytes]]) -> None:
        data = b"".join(struct.pack("<dI", at, len(body)) + body for at, body in chunk)
        self._file.write(data)
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _read_back(path: Path) -> int:
    data = path.read_bytes()
    offset = count = 0
    header = struct.calcsize("<dI")
    while offset < len(data):
        _, size = struct.unpack_from("<dI", data, offset)
        offset += header + size
        count += 1
    return count


async def _baseline(records: list[tuple[float, bytes]], root: Path) -> dict[str, float]:
    n = len(records)
    rates: dict[str, float] = {}
    for mode, writers in (("spill", 1), ("always", APPENDERS)):
        path = root / f"baseline-{mode}.log"
        log = _FileLog(path, fsync=mode == "always")
        lock = asyncio.Lock()  # one file: writers take turns, as a hand-written log would

        async def writer(
            part: list[tuple[float, bytes]], log: _FileLog = log, lock: asyncio.Lock = lock
        ) -> None:
            for k in range(0, len(part), BATCH):
                async with lock:
                    await asyncio.to_thread(log.write, part[k : k + BATCH])

        t0 = time.perf_counter()
        share = -(-n // writers)
        await asyncio.gather(
            *(writer(records[w * share : (w + 1) * share]) for w in range(writers))
        )
        rates[mode] = n / (time.perf_counter() - t0)
        log.close()
        if mode == "spill":
            t0 = time.perf_counter()
            assert await asyncio.to_thread(_read_back, path) == n
            rates["recovery"] = n / (time.perf_counter() - t0)
    return rates


# ----------------------------------------------------------------------------- the spool


async def _spool_runs(
    api: tuple[Any, Any], records: list[tuple[float, bytes]], root: Path
) -> dict[str, Any]:
    open_spool, spool_record = api
    n = len(records)
    wrapped = [spool_record(at, body) for at, body in records]
    out: dict[str, Any] = {}

    # spill: one appender, pending records; the probe watches the loop meanwhile.
    spool = await open_spool(root / "spill", durability="spill", max_bytes=2**31)
    probe = LoopProbe()
    failed = 0
    with GcWatch() as gcw:
        probe.start()
        t0 = time.perf_counter()
        for k in range(0, n, BATCH):
            failed += (await spool.append(wrapped[k : k + BATCH], claimed=False)).failed
        out["spill"] = n / (time.perf_counter() - t0)
        await probe.stop()
    clean, dirty = probe.lags_ms(gcw)
    own, _ = probe.lags_ms(gcw, own_work_only=True)
    out["stall_own_p99"] = percentile(own, 99)
    out["stall_p99"] = percentile(clean, 99)
    out["stall_max"] = max(clean, default=0.0)
    out["stall_samples"] = (len(clean), len(dirty))

    # recovery: claim and ack everything that was just written.
    t0 = time.perf_counter()
    recovered = 0
    while True:
        claimed = await spool.claim(CLAIM)
        if not claimed.records:
            break
        recovered += len(claimed.records)
        await spool.ack([record_id for record_id, _ in claimed.records])
    await spool.close()
    out["recovery"] = n / (time.perf_counter() - t0)
    out["recovered"] = recovered

    # always: concurrent appenders of claimed (written-ahead) records.
    spool = await open_spool(root / "always", durability="always", max_bytes=2**31)
    share = -(-n // APPENDERS)

    async def appender(part: list[Any]) -> int:
        lost = 0
        for k in range(0, len(part), BATCH):
            lost += (await spool.append(part[k : k + BATCH], claimed=True)).failed
        return lost

    t0 = time.perf_counter()
    failed += sum(
        await asyncio.gather(
            *(appender(wrapped[w * share : (w + 1) * share]) for w in range(APPENDERS))
        )
    )
    out["always"] = n / (time.perf_counter() - t0)
    await spool.close()
    out["failed"] = failed
    return out


async def spool_figures(n: int) -> list[Row]:
    """Spool write, recovery and stall rates vs a plain append-only file."""
    api = _spool_api()
    if api is None:
        return [
            Row("spool", "spool", None, "", note="skipped: telemetrydeck_async._spool not found")
        ]
    records = _bodies(n)
    with tempfile.TemporaryDirectory(prefix="td-bench-spool-") as tmp:
        root = Path(tmp)
        base = await _baseline(records, root)
        got = await _spool_runs(api, records, root)
    how = "client does not use the spool yet: " if not _client_uses_spool() else ""
    note = f"{how}Spool driven directly, n={n}, ~{len(records[0][1])} B per record"
    spill = Row(
        "spool.spill",
        f'spool write, durability="spill" (1 appender, batches of {BATCH})',
        got["spill"],
        "/s",
        base["spill"],
        "≥ 50,000/s",
        note=note + f"; failed {got['failed']}",
    )
    spill.met = got["spill"] >= 50_000
    always = Row(
        "spool.always",
        f'spool write, durability="always" ({APPENDERS} appenders, batches of {BATCH})',
        got["always"],
        "/s",
        base["always"],
        "≥ 20,000/s",
        note="baseline fsyncs each batch",
    )
    always.met = got["always"] >= 20_000
    recovery = Row(
        "spool.recovery",
        f"spool recovery, claim({CLAIM}) + ack",
        got["recovery"],
        "/s",
        base["recovery"],
        "≥ 100,000/s",
        note=f"{got['recovered']} recovered; baseline reads the file back",
    )
    recovery.met = got["recovery"] >= 100_000
    stall = Row(
        "spool.stall_p99",
        'loop stall p99 while spilling ("spill" writes)',
        got["stall_p99"],
        "ms",
        None,
        "≤ 1 ms",
        note=f"max {got['stall_max']:.2f} ms; samples (no GC, GC) {got['stall_samples']}; "
        f"own CPU only: p99 {got['stall_own_p99']:.2f} ms",
    )
    stall.met = got["stall_p99"] <= 1.0
    return [spill, always, recovery, stall]
