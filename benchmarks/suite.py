"""Run the figures, print the Markdown table, write the JSON file.

``python -m benchmarks`` runs the full suite (a few minutes on 2 cores); ``--quick`` runs every
figure with tiny N in seconds, for CI, where the numbers mean little: it checks that the suite
still runs. Targets are shown and judged, never asserted: the exit status is non-zero only
when a figure could not be measured at all.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import shlex
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import chart
from ._common import HERE, Row, Sink, fmt, machine
from .figures import Settings, burst, caller_cost, loop_stall, shutdown, throughput
from .hooks import hook_cost
from .memory import memory
from .peers import peers
from .service import instructions, service
from .spooling import spool_figures
from .sync import sync_caller_cost

FIGURES = (
    "caller",
    "hooks",
    "throughput",
    "stall",
    "memory",
    "burst",
    "spool",
    "shutdown",
    "sync",
    "peers",
    "service",
    "service-count",
)


def table(rows: list[Row]) -> str:
    """The Markdown table: figure, value, baseline, ratio, target, met?"""
    lines = [
        "| figure | value | baseline | ratio | target | met? |",
        "|---|---:|---:|---:|---|:---:|",
    ]
    for row in rows:
        ratio = row.ratio
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        lines.append(
            f"| {row.figure} | {fmt(row.value, row.unit)} | {fmt(row.baseline, row.unit)} | "
            f"{'—' if ratio is None else f'{ratio:.2f}x'} | {row.target} | {met} |"
        )
    return "\n".join(lines)


def peer_table(rows: list[Row]) -> str:
    """The peers figure as its own table: one line per client, four figures each."""
    lines = [
        "| client | caller µs per call | delivered/s | CPU µs per event | dropped |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        x = row.extra
        lines.append(
            f"| {x['label']} | {x['caller_us']:.2f} | {x['rate']:,.0f} | {x['cpu_us']:.1f} | "
            f"{x['dropped']:,.0f} |"
        )
    return "\n".join(lines)


def notes(rows: list[Row]) -> str:
    """One line of detail per row that has any."""
    return "\n".join(f"- {row.figure}: {row.note}" for row in rows if row.note)


async def run(settings: Settings, only: set[str]) -> tuple[list[Row], list[str]]:
    """Every selected figure in turn; a failing figure becomes an error row, the rest go on."""
    rows: list[Row] = []
    errors: list[str] = []
    async with Sink() as sink:

        def with_sink(
            bench: Callable[[Settings, Sink], Awaitable[list[Row]]],
        ) -> Callable[[], Awaitable[list[Row]]]:
            return lambda: bench(settings, sink)

        steps: dict[str, Callable[[], Awaitable[list[Row]]]] = {
            "caller": with_sink(caller_cost),
            "hooks": with_sink(hook_cost),
            "throughput": with_sink(throughput),
            "stall": with_sink(loop_stall),
            "memory": lambda: memory(settings.memory_n),
            "burst": with_sink(burst),
            "spool": with_sink(lambda s, sink: spool_figures(s.spool_n, sink)),
            "shutdown": with_sink(shutdown),
            "sync": with_sink(sync_caller_cost),
            "peers": with_sink(peers),
            "service": with_sink(service),
            "service-count": with_sink(instructions),
        }
        for name in FIGURES:
            if name not in only:
                continue
            gc.collect()
            t0 = time.perf_counter()
            print(f"... {name}", file=sys.stderr, flush=True)
            try:
                got = await steps[name]()
            except Exception as exc:
                traceback.print_exc()
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                got = [Row(name, f"{name} (failed)", None, "", note=f"{type(exc).__name__}: {exc}")]
            print(f"    {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            rows.extend(got)
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, report. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="telemetrydeck-async benchmarks (issue 7)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny N, seconds (for CI)")
    parser.add_argument(
        "--json",
        type=Path,
        default=HERE / "results.json",
        help="where to write the results (default: benchmarks/results.json)",
    )
    parser.add_argument(
        "--chart",
        type=Path,
        default=HERE / "results.svg",
        help="where to draw the chart, .svg or .png (default: benchmarks/results.svg)",
    )
    parser.add_argument(
        "--only",
        default=",".join(FIGURES),
        help=f"comma-separated subset of: {','.join(FIGURES)}",
    )
    args = parser.parse_args(argv)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = only - set(FIGURES)
    if unknown:
        parser.error(f"unknown figure(s): {', '.join(sorted(unknown))}")
    settings = Settings.make(args.quick)
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    rows, errors = asyncio.run(run(settings, only))
    elapsed = time.perf_counter() - t0
    command = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    info: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": command.strip(),
        "mode": "quick" if args.quick else "full",
        "seconds": round(elapsed, 1),
        "machine": machine(),
        "rows": [row.to_json() for row in rows],
        "errors": errors,
    }
    mach = info["machine"]
    peer_rows = [row for row in rows if row.key.startswith("peers.")]
    main_rows = [row for row in rows if not row.key.startswith("peers.")]
    print(
        f"## telemetrydeck-async benchmarks ({info['mode']}, {elapsed:.0f} s)\n\n"
        f"{mach['cpu']}, {mach['cores']} cores, {mach['python']}, {mach['os']}, "
        f"{info['date']}, load average at the end {mach['load_average']}\n\n"
        f"{table(main_rows)}\n\n{notes(main_rows)}"
    )
    if peer_rows:
        print(f"\n### The same workload through other clients\n\n{peer_table(peer_rows)}")
        print("\n" + notes(peer_rows))
    if args.quick:
        print("\n(quick mode: tiny N, the numbers are only a smoke test)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=2) + "\n")
    print(f"\nJSON written to {args.json}", file=sys.stderr)
    why_not = chart.available()
    if why_not is not None:
        print(f"no chart: {why_not}", file=sys.stderr)
    else:
        panels = chart.draw(rows, args.chart, chart.title_of(info))
        if panels:
            print(f"chart ({', '.join(panels)}) drawn to {args.chart}", file=sys.stderr)
        else:
            print("no chart: none of its figures ran (--only)", file=sys.stderr)
    return 1 if errors else 0
