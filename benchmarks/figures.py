"""The figures measured in this process against the sink: caller cost, throughput, loop stall,
burst at defaults and shutdown. Each one measures the hand-written baseline in the same run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import hashlib
import resource
import time
from dataclasses import dataclass
from typing import Any

import telemetrydeck_async._signal as signal_module
from telemetrydeck_async import TelemetryClient

from ._common import (
    APP_ID,
    BASELINE_BATCH,
    ENCODERS,
    NAMESPACE,
    SALT,
    SDK_PARAMETERS,
    SESSION_ID,
    SIGNAL_TYPE,
    USERS,
    BaselineSender,
    GcWatch,
    LoopProbe,
    LoopSlices,
    Row,
    Sink,
    median,
    payload,
    percentile,
    same_bytes_dict,
    turn_rows,
    wire_dict,
)

#: The fastest encoder the same-bytes baseline can use here.
FASTEST = "orjson" if "orjson" in ENCODERS else "stdlib"


@dataclass(frozen=True)
class Settings:
    """How many signals each figure uses (``--quick`` shrinks them for CI)."""

    quick: bool
    caller_n: int
    caller_chunk: int
    throughput_n: int
    repeats: int
    stall_n: int
    memory_n: int
    burst_n: int
    shutdown_n: int
    spool_n: int
    peers_n: int = 20_000
    peer_rounds: int = 3
    service_requests: int = 20_000
    service_rounds: int = 3

    @classmethod
    def make(cls, quick: bool) -> Settings:
        """The full suite, or its quick version."""
        if quick:
            return cls(
                True, 3_000, 1_000, 10_000, 1, 10_000, 10_000, 20_000, 10_000, 5_000,
                peers_n=2_000, peer_rounds=1, service_requests=500, service_rounds=1,
            )  # fmt: skip
        # Six throughput configurations, six service variants and five peers: 100,000 signals
        # x 3 runs keep the full suite near ten minutes on a shared 2-core machine; the service
        # figure takes 15,000 requests x 5 rounds (about four minutes), enough for the A/A pair
        # to show whether +10 µs per request can be told from noise.
        return cls(
            False, 100_000, 1_000, 100_000, 3, 200_000, 100_000, 50_000, 10_000, 200_000,
            peers_n=20_000, peer_rounds=3, service_requests=15_000, service_rounds=5,
        )  # fmt: skip


def client(sink: Sink, **options: Any) -> TelemetryClient:
    """A client aimed at the sink; other options at their defaults unless given."""
    return TelemetryClient(
        APP_ID,
        namespace=NAMESPACE,
        base_url=sink.base_url,
        salt=SALT,
        session_id=SESSION_ID,
        **options,
    )


# ----------------------------------------------------------------------------- 1. caller cost


def _timer_overhead_ns(n: int) -> float:
    """The median cost of an empty timed region (two perf_counter_ns calls and an append)."""
    ns = time.perf_counter_ns
    samples: list[int] = []
    record = samples.append
    for _ in range(n):
        t0 = ns()
        t1 = ns()
        record(t1 - t0)
    return median(samples)


async def caller_cost(s: Settings, sink: Sink) -> list[Row]:
    """µs per call, timed one call at a time, chunks of the four variants interleaved.

    Each call is timed alone with ``perf_counter_ns``; the median cost of an empty timed region
    (measured the same way) is subtracted from every sample. Between chunks the client is
    flushed outside the timed region, so its queue never overflows and never backs up.
    """
    ns = time.perf_counter_ns
    users = USERS
    overhead = _timer_overhead_ns(20_000)
    awaited: list[int] = []
    nowait: list[int] = []
    baseline: list[int] = []
    same: list[int] = []
    bare: list[int] = []
    buffer: list[dict[str, Any]] = []
    hashes: dict[str, str] = {}
    sha256 = hashlib.sha256
    now = dt.datetime.now
    utc = dt.timezone.utc
    sdk = SDK_PARAMETERS
    async with client(sink) as td:
        for i in range(1_000):  # warm up: first-call caches, the connection
            td.signal_nowait(SIGNAL_TYPE, client_user=users[i & 3], payload=payload(i))
        await td.flush()
        gc.collect()
        for start in range(0, s.caller_n, s.caller_chunk):
            stop = min(start + s.caller_chunk, s.caller_n)
            record = awaited.append
            for i in range(start, stop):
                t0 = ns()
                await td.signal(
                    SIGNAL_TYPE,
                    client_user=users[i & 3],
                    payload={"Bench.index": i, "Bench.plan": "pro", "Bench.flag": True},
                )
                t1 = ns()
                record(t1 - t0)
            await td.flush()
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
            record = baseline.append
            append = buffer.append
            for i in range(start, stop):
                t0 = ns()
                append(
                    {
                        "appID": APP_ID,
                        "clientUser": sha256((users[i & 3] + SALT).encode()).hexdigest(),
                        "sessionID": SESSION_ID,
                        "type": SIGNAL_TYPE,
                        "isTestMode": False,
                        "receivedAt": now(utc)
                        .isoformat(timespec="milliseconds")
                        .replace("+00:00", "Z"),
                        "payload": {
                            **sdk,
                            "Bench.index": i,
                            "Bench.plan": "pro",
                            "Bench.flag": True,
                        },
                    }
                )
                t1 = ns()
                record(t1 - t0)
            buffer.clear()
            record = same.append
            for i in range(start, stop):
                t0 = ns()
                user = users[i & 3]
                digest = hashes.get(user)
                if digest is None:
                    digest = hashes[user] = sha256((user + SALT).encode()).hexdigest()
                append(
                    {
                        "appID": APP_ID,
                        "clientUser": digest,
                        "sessionID": SESSION_ID,
                        "type": SIGNAL_TYPE,
                        "isTestMode": False,
                        "receivedAt": now(utc)
                        .isoformat(timespec="milliseconds")
                        .replace("+00:00", "Z"),
                        "payload": {
                            **sdk,
                            "Bench.index": i,
                            "Bench.plan": "pro",
                            "Bench.flag": True,
                        },
                    }
                )
                t1 = ns()
                record(t1 - t0)
            buffer.clear()
            record = bare.append
            for i in range(start, stop):
                t0 = ns()
                append(
                    {
                        "type": SIGNAL_TYPE,
                        "clientUser": users[i & 3],
                        "payload": {"Bench.index": i, "Bench.plan": "pro", "Bench.flag": True},
                    }
                )
                t1 = ns()
                record(t1 - t0)
            buffer.clear()
        dropped = td.stats.dropped_total

    def us(samples: list[int], q: float) -> float:
        return max(percentile(samples, q) - overhead, 0.0) / 1000

    note = f"timer overhead {overhead:.0f} ns subtracted; n={s.caller_n} per variant"
    rows: list[Row] = []
    for key, label, samples in (
        ("await", "`await td.signal()`", awaited),
        ("nowait", "`td.signal_nowait()`", nowait),
    ):
        med = Row(
            f"caller.{key}.median",
            f"caller cost {label}, median, vs same-bytes build + append",
            us(samples, 50),
            "µs",
            us(same, 50),
            "≤ 2x baseline",
            note=note + "; baseline: the same wire dict, user hash cached",
        )
        med.met = med.ratio is not None and med.ratio <= 2.0
        rows.append(med)
        rows.append(
            Row(
                f"caller.{key}.median_first",
                f"caller cost {label}, median, vs the first baseline (a hash per call)",
                us(samples, 50),
                "µs",
                us(baseline, 50),
            )
        )
        rows.append(
            Row(
                f"caller.{key}.p99",
                f"caller cost {label}, p99, vs same-bytes",
                us(samples, 99),
                "µs",
                us(same, 99),
                note="GC pauses included on both sides",
            )
        )
    rows.append(
        Row(
            "caller.bare_append.median",
            "bare `dict` + `list.append` (no hash, no timestamp), median",
            us(bare, 50),
            "µs",
            note="reference only: what any call costs at the least",
            extra={"dropped": dropped},
        )
    )
    return rows


# ----------------------------------------------------------------------------- 2. throughput


def _cpu() -> float:
    """CPU seconds this process used so far (user + system): immune to other processes."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _client_run(
    sink: Sink, n: int, *, stdlib: bool = False, **options: Any
) -> tuple[float, float, int, int]:
    """(signals/s, CPU µs per signal, delivered, dropped) for ``n`` awaited signals + a flush.

    ``stdlib``: encode with the stdlib even when orjson (the ``fast`` extra) is installed.
    """
    saved = getattr(signal_module, "_orjson_dumps", None)  # None before the fast extra existed
    if stdlib:
        signal_module._orjson_dumps = None  # as if the extra were not installed
    try:
        async with client(sink, **options) as td:
            for i in range(1_000):  # warm up the connections and the sink
                await td.signal(SIGNAL_TYPE, client_user=USERS[i & 3], payload=payload(i))
            await td.flush()
            before = await sink.count()
            dropped_before = td.stats.dropped_total
            gc.collect()
            cpu0 = _cpu()
            t0 = time.perf_counter()
            for i in range(n):
                await td.signal(
                    SIGNAL_TYPE,
                    client_user=USERS[i & 3],
                    payload={"Bench.index": i, "Bench.plan": "pro", "Bench.flag": True},
                )
            await td.flush()
            elapsed = time.perf_counter() - t0
            cpu = _cpu() - cpu0
            dropped = td.stats.dropped_total - dropped_before
    finally:
        if hasattr(signal_module, "_orjson_dumps"):
            signal_module._orjson_dumps = saved
    return n / elapsed, cpu / n * 1e6, await sink.count() - before, dropped


async def _baseline_run(sink: Sink, n: int, **options: Any) -> tuple[float, float, int]:
    """(signals/s, CPU µs per signal, delivered) for a hand-written batched loop."""
    async with BaselineSender(sink.ingest_url, **options) as sender:
        await sender.produce(0, 1_000)
        await sender.drain()
        before = await sink.count()
        gc.collect()
        cpu0 = _cpu()
        t0 = time.perf_counter()
        await sender.produce(0, n)
        await sender.drain()
        elapsed = time.perf_counter() - t0
        cpu = _cpu() - cpu0
    return n / elapsed, cpu / n * 1e6, await sink.count() - before


def same_bytes_check(sink: Sink) -> str:
    """Check that the SDK and the same-bytes baseline encode signal 7 to the same bytes."""
    td = client(sink)
    made = td._build(SIGNAL_TYPE, USERS[7 & 3], None, payload(7), None, None)
    ours = signal_module.encode_signal(made, APP_ID)
    wire = same_bytes_dict(7)
    wire["receivedAt"] = signal_module.format_received_at(made.received_at)
    results = []
    for name, encode in ENCODERS.items():
        theirs = bytes(encode([wire]))[1:-1]
        results.append(f"{name} {'identical' if theirs == ours else 'DIFFERENT'}")
    return "bytes of one signal, SDK vs same-bytes baseline: " + ", ".join(results)


#: The throughput runs: (key, label, kind, options), measured interleaved.
_RUNS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("base500", "first baseline, 500 per request", "baseline", {}),
    ("client500", "client, batch_size=500", "client", {"batch_size": 500}),
    (
        "same.orjson",
        "same-bytes baseline, orjson",
        "baseline",
        {"batch": 100, "encoder": "orjson", "same_bytes": True},
    ),
    (
        "same.stdlib",
        "same-bytes baseline, stdlib json",
        "baseline",
        {"batch": 100, "encoder": "stdlib", "same_bytes": True},
    ),
    ("client", "client at defaults", "client", {}),
    ("client.stdlib", "client at defaults, stdlib encoder", "client", {"stdlib": True}),
)


async def throughput(s: Settings, sink: Sink) -> list[Row]:
    """Delivered signals/s and CPU per signal: the client against the hand-written baselines.

    The runs are interleaved (every configuration once, then again), so that drift and other
    processes on the machine hit every side alike; the median of the runs is reported. CPU
    time per signal of this process (all threads) is reported beside: it does not count time
    the process spent waiting for a core, so it is steadier on a shared machine.
    """
    fast = "orjson" in ENCODERS
    runs = [
        run
        for run in _RUNS
        if fast or (run[3].get("encoder") != "orjson" and not run[3].get("stdlib"))
    ]
    got: dict[str, list[tuple[float, float]]] = {key: [] for key, *_ in runs}
    lost = 0
    for _ in range(s.repeats):
        for key, _label, kind, options in runs:
            if kind == "baseline":
                rate, cpu, delivered = await _baseline_run(sink, s.throughput_n, **options)
                dropped = 0
            else:
                rate, cpu, delivered, dropped = await _client_run(sink, s.throughput_n, **options)
            got[key].append((rate, cpu))
            lost += s.throughput_n - delivered + dropped

    def rate(key: str) -> float:
        return median([r for r, _ in got[key]])

    def cpu(key: str) -> float:
        return median([c for _, c in got[key]])

    def spread(key: str) -> str:
        rates = [r for r, _ in got[key]]
        return f"{min(rates):,.0f}-{max(rates):,.0f}/s"

    note = f"n={s.throughput_n}, median of {s.repeats} interleaved runs"
    if lost:
        note += f"; {lost} signal(s) NOT delivered"
    fastest = "same.orjson" if fast else "same.stdlib"
    client_label = "client at defaults" + (" (orjson installed)" if fast else "")
    rows = [
        Row(
            "throughput.defaults",
            f"delivered signals/s, {client_label}, vs same-bytes "
            f"{'orjson' if fast else 'stdlib'} (100 per request)",
            rate("client"),
            "/s",
            rate(fastest),
            "≥ 90% of baseline",
            met=rate("client") >= 0.9 * rate(fastest),
            note=f"{note}; client {spread('client')}, baseline {spread(fastest)}; "
            + same_bytes_check(sink),
            extra={"runs": got["client"], "baseline_runs": got[fastest]},
        ),
        Row(
            "throughput.defaults.cpu",
            f"CPU per delivered signal, {client_label}, vs same-bytes "
            f"{'orjson' if fast else 'stdlib'}",
            cpu("client"),
            "µs",
            cpu(fastest),
            "≤ 1.25x baseline",
            met=cpu("client") <= 1.25 * cpu(fastest),
            note="the same runs; all threads of this process, the sink not counted",
        ),
    ]
    if fast:
        rows += [
            Row(
                "throughput.defaults.vs_stdlib",
                "delivered signals/s, client at defaults, vs same-bytes stdlib",
                rate("client"),
                "/s",
                rate("same.stdlib"),
                note=f"baseline {spread('same.stdlib')}",
            ),
            Row(
                "throughput.defaults.cpu.vs_stdlib",
                "CPU per delivered signal, client at defaults, vs same-bytes stdlib",
                cpu("client"),
                "µs",
                cpu("same.stdlib"),
            ),
            Row(
                "throughput.stdlib",
                "delivered signals/s, client without orjson, vs same-bytes stdlib",
                rate("client.stdlib"),
                "/s",
                rate("same.stdlib"),
                note=f"client {spread('client.stdlib')}",
                extra={"runs": got["client.stdlib"]},
            ),
            Row(
                "throughput.stdlib.cpu",
                "CPU per delivered signal, client without orjson, vs same-bytes stdlib",
                cpu("client.stdlib"),
                "µs",
                cpu("same.stdlib"),
            ),
        ]
    rows += [
        Row(
            "throughput.batch500",
            "delivered signals/s, `batch_size=500`, vs the first baseline (500 per request)",
            rate("client500"),
            "/s",
            rate("base500"),
            "≥ 80% of baseline",
            met=rate("client500") >= 0.8 * rate("base500"),
            note=f"client {spread('client500')}, baseline {spread('base500')}",
            extra={"runs": got["client500"], "baseline_runs": got["base500"]},
        ),
        Row(
            "throughput.batch500.cpu",
            "CPU per delivered signal, `batch_size=500`, vs the first baseline",
            cpu("client500"),
            "µs",
            cpu("base500"),
            "≤ 1.25x baseline",
            met=cpu("client500") <= 1.25 * cpu("base500"),
        ),
    ]
    return rows


# ----------------------------------------------------------------------------- 3. loop stall


def _stall_rows(
    key: str, label: str, probe: LoopProbe, gcw: GcWatch, base: tuple[LoopProbe, GcWatch]
) -> list[Row]:
    clean, dirty = probe.lags_ms(gcw)
    base_clean, _ = base[0].lags_ms(base[1])
    pauses = gcw.durations_ms()
    base_pauses = base[1].durations_ms()
    p99 = Row(
        f"{key}.p99",
        f"loop stall p99, {label} (probe samples without GC)",
        percentile(clean, 99),
        "ms",
        percentile(base_clean, 99),
        "≤ 1 ms",
        note=f"{len(clean)} samples, {len(dirty)} overlapped a GC pause",
    )
    p99.met = p99.value is not None and p99.value <= 1.0
    worst = Row(
        f"{key}.max",
        f"loop stall max, {label} (without GC)",
        max(clean, default=0.0),
        "ms",
        max(base_clean, default=0.0),
        "≤ 5 ms",
        note=f"max with GC: {max(clean + dirty, default=0.0):.2f} ms",
    )
    worst.met = worst.value is not None and worst.value <= 5.0
    own, _ = probe.lags_ms(gcw, own_work_only=True)
    base_own, _ = base[0].lags_ms(base[1], own_work_only=True)
    own_row = Row(
        f"{key}.p99_own",
        f"loop stall p99, {label}, own CPU only (without GC)",
        percentile(own, 99),
        "ms",
        percentile(base_own, 99),
        "≤ 1 ms",
        note=f"each lag capped by this process's CPU time meanwhile: time spent waiting for a "
        f"core (other processes) left out; max {max(own, default=0.0):.2f} ms",
    )
    own_row.met = own_row.value is not None and own_row.value <= 1.0
    gc_row = Row(
        f"{key}.gc_max",
        f"GC pause max during {label}",
        max(pauses, default=0.0),
        "ms",
        max(base_pauses, default=0.0),
        "reported beside",
        note=f"{len(pauses)} collections, p99 {percentile(pauses, 99):.2f} ms, "
        f"gen2: {sum(1 for p in gcw.pauses if p[2] == 2)}",
    )
    return [p99, worst, own_row, gc_row]


async def loop_stall(s: Settings, sink: Sink) -> list[Row]:
    """Probe lag while 200,000 signals are delivered; the producer yields every 10 signals.

    Yielding every 10 calls keeps the producer's own slice (~10 calls) far below 1 ms, so what
    the probe sees is the SDK's background work (cutting, encoding, sending batches).
    """
    n = s.stall_n
    # The idle loop: what the machine's timers alone make of a 1 ms sleep (the floor of every
    # figure below), probed long enough for its p99 to mean something.
    idle = LoopProbe()
    with GcWatch() as idle_gc:
        idle.start()
        await asyncio.sleep(0.3 if s.quick else 2.0)
        await idle.stop()
    turns: dict[str, LoopSlices] = {"base": LoopSlices(), "client": LoopSlices()}

    # The baseline: the same-bytes client (100 per request, the fastest encoder), the
    # practical limit of what sending costs the loop.
    gc.collect()
    base_probe = LoopProbe()
    with GcWatch() as base_gc:
        async with BaselineSender(
            sink.ingest_url, batch=100, encoder=FASTEST, same_bytes=True
        ) as sender:
            base_probe.start()
            turns["base"].start()
            await sender.produce(0, n, yield_every=10)
            await sender.drain()
            turns["base"].stop()
            await base_probe.stop()

    gc.collect()
    probe = LoopProbe()
    with GcWatch() as gcw:
        async with client(sink) as td:
            probe.start()
            turns["client"].start()
            for i in range(n):
                await td.signal(
                    SIGNAL_TYPE,
                    client_user=USERS[i & 3],
                    payload={"Bench.index": i, "Bench.plan": "pro", "Bench.flag": True},
                )
                if i % 10 == 0:
                    await asyncio.sleep(0)
            await td.flush()
            turns["client"].stop()
            await probe.stop()
    rows = _stall_rows("stall", "client at defaults", probe, gcw, (base_probe, base_gc))
    idle_clean, _ = idle.lags_ms(idle_gc)
    rows[
        0
    ].note += (
        f"; n={n}; baseline: the same-bytes client ({FASTEST}, 100 per request), yielding as often"
    )
    rows.insert(
        0,
        Row(
            "stall.idle_p99",
            "loop stall p99, idle loop (nothing else running: the machine's floor)",
            percentile(idle_clean, 99),
            "ms",
            note=f"{len(idle_clean)} samples of a 1 ms sleep; "
            f"max {max(idle_clean, default=0.0):.2f} ms",
        ),
    )
    rows.extend(turn_rows("stall", "client at defaults", turns["client"], turns["base"]))
    return rows


# ----------------------------------------------------------------------------- 5. burst


async def burst(s: Settings, sink: Sink) -> list[Row]:
    """20,000 signals as fast as possible at default settings: how many were dropped."""
    n = s.burst_n
    async with BaselineSender(sink.ingest_url) as sender:
        before = await sink.count()
        await sender.produce(0, n)
        await sender.drain()
        base_dropped = n - (await sink.count() - before)
    rows: list[Row] = []
    for key, label in (("await", "`await td.signal()`"), ("nowait", "`td.signal_nowait()`")):
        async with TelemetryClient(APP_ID, namespace=NAMESPACE, base_url=sink.base_url) as td:
            before = await sink.count()
            t0 = time.perf_counter()
            if key == "await":
                for i in range(n):
                    await td.signal(SIGNAL_TYPE, client_user=USERS[i & 3], payload=payload(i))
            else:
                for i in range(n):
                    td.signal_nowait(SIGNAL_TYPE, client_user=USERS[i & 3], payload=payload(i))
            await td.flush()
            elapsed = time.perf_counter() - t0
            stats = td.stats
        delivered = await sink.count() - before
        row = Row(
            f"burst.{key}",
            f"burst of {n:,} at defaults, {label}: dropped",
            float(stats.dropped_total),
            "",
            float(base_dropped),
            "0",
            note=f"{delivered} delivered in {elapsed:.2f} s; dropped by reason "
            f"{dict(stats.dropped) or '{}'}; baseline list is unbounded",
        )
        row.met = stats.dropped_total == 0
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 7. shutdown


async def shutdown(s: Settings, sink: Sink) -> list[Row]:
    """``aclose()`` with 10,000 queued signals and a healthy endpoint (connection warm)."""
    n = s.shutdown_n
    td = client(sink)
    await td.signal(SIGNAL_TYPE, client_user=USERS[0], payload=payload(0))
    await td.flush()
    before = await sink.count()
    for i in range(n):
        td.signal_nowait(SIGNAL_TYPE, client_user=USERS[i & 3], payload=payload(i))
    pending = td.stats.pending
    t0 = time.perf_counter()
    result = await td.aclose()
    elapsed = time.perf_counter() - t0
    delivered = await sink.count() - before

    items = [wire_dict(i) for i in range(n)]
    async with BaselineSender(sink.ingest_url) as sender:
        await sender.produce(0, 1)
        await sender.drain()
        t0 = time.perf_counter()
        for k in range(0, n, BASELINE_BATCH):
            sender.buffer = items[k : k + BASELINE_BATCH]
            await sender.send_buffer()
        await sender.drain()
        base_elapsed = time.perf_counter() - t0
    row = Row(
        "shutdown.aclose",
        f"`aclose()` with {pending:,} pending, healthy endpoint",
        elapsed,
        "s",
        base_elapsed,
        "< 1 s",
        note=f"sent {result.sent}, delivered {delivered}, dropped {dict(result.dropped) or 0}; "
        "baseline: encode + POST the same number, 500 per request",
    )
    row.met = elapsed < 1.0 and result.sent == n
    return [row]
