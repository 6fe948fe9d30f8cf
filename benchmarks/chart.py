"""The chart of a run: what people would rather look at than a long table.

Drawn with matplotlib (the ``bench`` extra) from the rows of a run, as one SVG or PNG (by the
file's suffix) with up to five panels:

* caller cost per call, per client (the peers figure; log scale: the clients differ 100-fold);
* delivered events per second, per client;
* events dropped of those sent, per client;
* the service benchmark: requests/s and server CPU per request, against no analytics;
* the loop stall while the client spills to disk, over time (probe lag per sample).

A panel whose figure did not run is left out. Without matplotlib no chart is drawn, and the
reason is printed; the table and the JSON file are written all the same.

``python -m benchmarks.chart RESULTS.json OUT.svg`` draws the chart again from a run's JSON file
(``benchmarks/results.json`` by default), so the chart and the table always come from one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from ._common import Row

# One colour per kind of client, so the eye finds "this SDK" in every panel.
_COLOURS = {"sdk": "#1f77b4", "hand": "#7f7f7f", "peer": "#ff7f0e"}


def _kind(key: str) -> str:
    if key.startswith("peers.sdk") or key in ("nowait", "middleware"):
        return "sdk"
    if key.startswith("peers.hand") or key in ("none", "none-again", "hand"):
        return "hand"
    return "peer"


def available() -> str | None:
    """None when a chart can be drawn, else the reason it cannot."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed: pip install -e '.[bench]' to draw the chart"
    return None


def draw(rows: list[Row], path: Path, title: str) -> list[str]:
    """Draw the panels that have data into ``path``; return the panels' names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    by_key = {row.key: row for row in rows}
    peers = [row for row in rows if row.key.startswith("peers.") and row.extra]
    service = [row for row in rows if row.key.startswith("service.") and row.key.endswith(".rate")]
    spill = by_key.get("spool.client.stall_p99")
    series: list[Any] = spill.extra.get("series", []) if spill is not None else []

    panels: list[str] = []
    if peers:
        panels += ["caller", "rate", "dropped"]
    if service:
        panels.append("service")
    if series:
        panels.append("stall")
    if not panels:
        return []

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.1 * len(panels)), squeeze=False)
    fig.suptitle(title, fontsize=10)
    for ax, panel in zip((a[0] for a in axes), panels, strict=True):
        if panel in ("caller", "rate", "dropped"):
            labels = [row.extra["label"].replace("`", "") for row in peers]
            colours = [_COLOURS[_kind(row.key)] for row in peers]
            field, xlabel = {
                "caller": ("caller_us", "caller µs per call (log scale; lower is better)"),
                "rate": ("rate", "delivered events per second (higher is better)"),
                "dropped": ("dropped", "events dropped (lower is better)"),
            }[panel]
            values = [float(row.extra[field]) for row in peers]
            bars = ax.barh(labels, values, color=colours)
            ax.invert_yaxis()
            if panel == "caller":
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            else:
                ax.set_xlim(0, max(1.0, *values) * 1.15)  # room for the labels
            ax.bar_label(bars, fmt="%.3g" if panel == "caller" else "{:,.0f}", fontsize=8)
            ax.set_xlabel(xlabel, fontsize=9)
        elif panel == "service":
            labels = [row.extra["label"].replace("`", "") for row in service]
            keys = [row.key.split(".")[1] for row in service]
            # The paired figures the table reports (each round against its own no-SDK
            # server), falling back to the medians' ratio for results written without them.
            ratios = [row.extra.get("paired_ratio", row.ratio) or 0.0 for row in service]
            cpu = [by_key[f"service.{key}.cpu"] for key in keys]
            bars = ax.barh(labels, ratios, color=[_COLOURS[_kind(k)] for k in keys])
            ax.invert_yaxis()
            ax.axvline(0.95, color="#2ca02c", linestyle="--", linewidth=1)
            ax.set_xlim(0, max(1.0, *ratios) * 1.45)  # room for the labels
            ax.bar_label(
                bars,
                labels=[
                    f"{r:.2f}x, CPU "
                    f"{c.extra.get('paired_us', c.value - (c.baseline or 0)):+.0f} µs/req"
                    for r, c in zip(ratios, cpu, strict=True)
                ],
                fontsize=8,
            )
            ax.set_xlabel(
                "FastAPI + uvicorn: requests/s against no analytics (dashed: the 0.95x target)",
                fontsize=9,
            )
        else:
            xs = [t for t, _ in series]
            ys = [lag for _, lag in series]
            ax.plot(xs, ys, linewidth=0.8, color=_COLOURS["sdk"])
            ax.axhline(1.0, color="#2ca02c", linestyle="--", linewidth=1)
            ax.set_xlabel("seconds since the burst began", fontsize=9)
            ax.set_ylabel("loop lag, ms", fontsize=9)
            ax.set_title(
                "event-loop stall while the client spills a burst to disk (dashed: 1 ms)",
                fontsize=9,
            )
        ax.tick_params(labelsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return panels


def title_of(info: dict[str, Any]) -> str:
    """The chart's title: the run's mode, date and machine."""
    return (
        f"telemetrydeck-async benchmarks ({info['mode']}), {info['date']}, {info['machine']['cpu']}"
    )


def rows_from_json(info: dict[str, Any]) -> list[Row]:
    """The rows of a run, read back from the JSON file the suite wrote."""
    return [
        Row(
            key=raw["key"],
            figure=raw["figure"],
            value=raw["value"],
            unit=raw["unit"],
            baseline=raw.get("baseline"),
            target=raw.get("target", "—"),
            met=raw.get("met"),
            note=raw.get("note", ""),
            extra=raw.get("extra", {}),
        )
        for raw in info["rows"]
    ]


def main(argv: list[str] | None = None) -> int:
    """Draw the chart of a finished run from its JSON file."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chart", description="draw the chart of a run from its JSON"
    )
    parser.add_argument(
        "results", type=Path, nargs="?", default=Path(__file__).parent / "results.json"
    )
    parser.add_argument(
        "chart", type=Path, nargs="?", default=Path(__file__).parent / "results.svg"
    )
    args = parser.parse_args(argv)
    why_not = available()
    if why_not is not None:
        print(f"no chart: {why_not}", file=sys.stderr)
        return 1
    info = json.loads(args.results.read_text())
    panels = draw(rows_from_json(info), args.chart, title_of(info))
    if not panels:
        print(f"no chart: {args.results} holds none of its figures", file=sys.stderr)
        return 1
    print(f"chart ({', '.join(panels)}) drawn to {args.chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
