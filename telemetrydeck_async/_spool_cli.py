"""``spool status`` and ``spool drain``: looking into and emptying a spool directory by hand.

Kept apart from ``__main__`` so the CLI module stays a table of commands, and from ``_spool``
so the storage engine knows nothing about terminals.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from pathlib import Path

import attrs

from ._client import TelemetryClient
from ._retry import RetryPolicy
from ._spool import DB_NAME, SpoolStatus, open_spool

__all__ = ["add_spool_commands", "spool_main"]


def add_spool_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``spool status DIR`` and ``spool drain DIR ...`` to the CLI's subcommands."""
    spool = commands.add_parser("spool", help="inspect or drain an on-disk spool directory")
    actions = spool.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="what a spool directory holds")
    status.add_argument("directory", help="the client's spool_dir")
    drain = actions.add_parser("drain", help="send everything in a spool directory now")
    drain.add_argument("directory", help="the client's spool_dir")
    drain.add_argument("--app-id", required=True, help="the app ID the signals belong to")
    drain.add_argument("--namespace", help="your namespace, e.g. com.example")
    drain.add_argument("--base-url", help="ingest server (default: TelemetryDeck's)")
    drain.add_argument(
        "--timeout", type=float, default=300.0, help="give up after this many seconds (300)"
    )


def _when(unix: float | None) -> str:
    if unix is None:
        return "-"
    return dt.datetime.fromtimestamp(unix, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]  # a float from here on, only for display
    return f"{n} B"  # pragma: no cover  # the loop always returns


def _print_status(status: SpoolStatus) -> None:
    rows = [
        ("spool", status.path),
        ("records (signals)", str(status.records)),
        ("size", _size(status.bytes)),
        ("oldest receivedAt", _when(status.oldest_received_at)),
        ("newest receivedAt", _when(status.newest_received_at)),
        ("owners", str(len(status.owners))),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for owner in status.owners:
        state = "alive" if owner.alive else ("closed" if owner.closed else "dead")
        print(
            f"  owner {owner.owner_id} pid {owner.pid} on {owner.hostname}: {state}, "
            f"{owner.claimed} claimed, last heartbeat {_when(owner.heartbeat_at)}"
        )


async def _status(directory: Path) -> int:
    spool = await open_spool(directory)
    try:
        status = await spool.status()
    finally:
        await spool.close()
    if status.disabled:
        print(f"error: the spool in {directory} cannot be read (see the log)", file=sys.stderr)
        return 1
    # This command opened the spool as an owner too: list only the others.
    others = tuple(o for o in status.owners if o.owner_id != spool.owner_id)
    _print_status(attrs.evolve(status, owners=others))
    return 0


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width if total == 0 else min(width, width * done // max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} sent")
    sys.stderr.flush()


async def _drain(args: argparse.Namespace, directory: Path) -> int:
    options = {"base_url": args.base_url} if args.base_url else {}
    deadline = min(args.timeout, 120.0)
    async with TelemetryClient(
        args.app_id,
        namespace=args.namespace,
        spool_dir=str(directory),
        flush_interval=0.2,
        retry=RetryPolicy(deadline=deadline, max_backoff=min(30.0, deadline)),
        **options,
    ) as td:
        show = sys.stderr.isatty()
        end = time.monotonic() + args.timeout
        total: int | None = None
        while time.monotonic() < end:
            stats = td.stats
            if stats.spool_records is not None:
                if total is None:
                    total = stats.spool_records
                if show:
                    _progress(stats.recovered, total)
                if stats.spool_records == 0:
                    break
            await asyncio.sleep(0.2)
        stats = td.stats
    if show:
        sys.stderr.write("\n")
    left = stats.spool_records or 0
    dropped = sum(stats.spool_dropped.values())
    print(f"sent {stats.recovered} signal(s); {dropped} given up; {left} left in the spool")
    if left:
        reason = (
            f": {stats.last_error.type}: {stats.last_error.message}" if stats.last_error else ""
        )
        print(f"error: {left} signal(s) could not be sent{reason}", file=sys.stderr)
        return 1
    return 0


def spool_main(args: argparse.Namespace) -> int:
    """Run ``spool status`` or ``spool drain``; return the exit code."""
    directory = Path(args.directory)
    if not (directory / DB_NAME).is_file():
        print(f"error: no spool in {directory} (no {DB_NAME} there)", file=sys.stderr)
        return 1
    if args.spool_command == "status":
        return asyncio.run(_status(directory))
    return asyncio.run(_drain(args, directory))
