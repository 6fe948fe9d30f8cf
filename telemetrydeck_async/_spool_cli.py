"""``spool status`` and ``spool drain``: looking into and emptying a spool directory by hand.

Kept apart from ``__main__`` so the CLI module stays a table of commands, and from ``_spool``
so the storage engine knows nothing about terminals.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import sys
import time
from pathlib import Path

import attrs

from ._client import TelemetryClient
from ._config import ClientConfig
from ._retry import RetryPolicy
from ._spool import DB_NAME, Destination, DestinationInfo, Spool, SpoolStatus, open_spool
from .exceptions import ConfigurationError

__all__ = ["add_spool_commands", "spool_main"]


def add_spool_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``spool status DIR`` and ``spool drain DIR ...`` to the CLI's subcommands."""
    spool = commands.add_parser("spool", help="inspect or drain an on-disk spool directory")
    actions = spool.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="what a spool directory holds, per destination")
    status.add_argument("directory", help="the client's spool_dir")
    drain = actions.add_parser(
        "drain",
        help="send everything in a spool directory now, each signal to its own destination",
    )
    drain.add_argument("directory", help="the client's spool_dir")
    drain.add_argument(
        "--app-id",
        help="drain only this app's destination (with --namespace/--base-url), and send"
        " signals written by older versions, which have no destination, there too",
    )
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


def _where(info: DestinationInfo) -> str:
    if info.destination is None:
        return "no destination (written by an older version)"
    return f"{info.destination.url} app {info.destination.app_id}"


def _print_status(status: SpoolStatus) -> None:
    rows = [
        ("spool", status.path),
        ("records (signals)", str(status.records)),
        ("size", _size(status.bytes)),
        ("oldest receivedAt", _when(status.oldest_received_at)),
        ("newest receivedAt", _when(status.newest_received_at)),
        ("destinations", str(len(status.destinations))),
        ("owners", str(len(status.owners))),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for info in status.destinations:
        print(f"  to {_where(info)}: {info.records} record(s), {_size(info.bytes)}")
    for owner in status.owners:
        state = "alive" if owner.alive else ("closed" if owner.closed else "dead")
        print(
            f"  owner {owner.owner_id} pid {owner.pid} on {owner.hostname}: {state}, "
            f"{owner.claimed} claimed, last heartbeat {_when(owner.heartbeat_at)}"
        )


async def _read(spool: Spool, directory: Path) -> SpoolStatus | None:
    """The spool's status per destination, or None after saying on stderr why it failed."""
    status = await spool.status(by_destination=True)
    if status.error is not None:
        print(f"error: the spool in {directory} cannot be read: {status.error}", file=sys.stderr)
        return None
    return status


async def _status(directory: Path) -> int:
    spool = await open_spool(directory)
    try:
        status = await _read(spool, directory)
    finally:
        await spool.close()
    if status is None:
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


#: ``endpoint_url`` taken apart: ``{base_url}/v2/`` or ``{base_url}/v2/namespace/{ns}/``.
_ENDPOINT = re.compile(r"^(?P<base>.+?)/v2/(?:namespace/(?P<namespace>[^/]+)/)?$")


def _client_options(destination: Destination) -> dict[str, str | None] | None:
    """base_url and namespace that make a client send to ``destination``, or None."""
    match = _ENDPOINT.match(destination.url)
    if match is None:
        return None
    options = {"base_url": match["base"], "namespace": match["namespace"]}
    try:
        config = ClientConfig(app_id=destination.app_id, **options)  # type: ignore[arg-type]  # reason: str | None values, validated by the config itself
    except ConfigurationError:
        return None
    return options if config.endpoint_url == destination.url else None


@attrs.define
class _Drained:
    sent: int = 0
    given_up: int = 0
    error: str = ""


async def _drain_one(
    destination: Destination,
    options: dict[str, str | None],
    directory: Path,
    observer: Spool,
    end: float,
    done: _Drained,
) -> int | None:
    """Send the records of one destination; return how many are left (None: unreadable)."""
    deadline = max(1.0, min(end - time.monotonic(), 120.0))
    show = sys.stderr.isatty()
    total: int | None = None
    left: int | None = None
    async with TelemetryClient(
        destination.app_id,
        spool_dir=str(directory),
        flush_interval=0.2,
        retry=RetryPolicy(deadline=deadline, max_backoff=min(30.0, deadline)),
        **{k: v for k, v in options.items() if v is not None},  # type: ignore[arg-type]  # reason: only str options here
    ) as td:
        while True:
            status = await _read(observer, directory)
            if status is None:
                left = None
                break
            left = sum(
                info.records for info in status.destinations if info.destination == destination
            )
            if total is None:
                total = left
            if show:
                _progress(td.stats.recovered, total)
            if left == 0 or time.monotonic() >= end:
                break
            await asyncio.sleep(0.3)
        stats = td.stats
    if show:
        sys.stderr.write("\n")
    done.sent += stats.recovered
    done.given_up += sum(stats.spool_dropped.values())
    if stats.last_error is not None:
        done.error = f": {stats.last_error.type}: {stats.last_error.message}"
    return left


async def _drain(args: argparse.Namespace, directory: Path) -> int:
    end = time.monotonic() + args.timeout
    observer = await open_spool(directory)  # reads only: it never claims anything
    try:
        status = await _read(observer, directory)
        if status is None:
            return 1
        wanted: Destination | None = None
        if args.app_id is not None:
            options: dict[str, str | None] = {"namespace": args.namespace}
            if args.base_url:
                options["base_url"] = args.base_url
            try:
                config = ClientConfig(app_id=args.app_id, **options)  # type: ignore[arg-type]  # reason: str | None values, validated by the config itself
            except ConfigurationError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            wanted = Destination(config.endpoint_url, config.app_id)
        held = [info for info in status.destinations if info.records]
        untagged = sum(info.records for info in held if info.destination is None)
        if wanted is None and untagged:
            print(
                f"error: {untagged} signal(s) in {directory} have no destination (written by"
                " an older version); nothing was sent. Say where they go with --app-id (and"
                " --namespace, --base-url): that destination's signals and these are sent"
                " there.",
                file=sys.stderr,
            )
            return 1
        targets = [info.destination for info in held if info.destination is not None]
        refused = 0
        if wanted is not None:
            refused = sum(
                info.records
                for info in held
                if info.destination is not None and info.destination != wanted
            )
            targets = [wanted]
        done = _Drained()
        left = 0
        unreadable = False
        for destination in targets:
            options = _client_options(destination) or {}
            if not options:
                print(f"error: cannot send to {destination.url!r}: not an endpoint URL")
                continue
            remaining = await _drain_one(destination, options, directory, observer, end, done)
            if remaining is None:
                unreadable = True
            else:
                left += remaining
    finally:
        await observer.close()
    print(f"sent {done.sent} signal(s); {done.given_up} given up; {left} left in the spool")
    if refused and wanted is not None:
        others = sorted({_where(info) for info in held if info.destination not in (None, wanted)})
        print(
            f"error: {refused} signal(s) belong to other destinations and were not sent to"
            f" {wanted.url} app {wanted.app_id}: {'; '.join(others)}. Run `spool drain"
            f" {directory}` without --app-id to send each to its own destination.",
            file=sys.stderr,
        )
    if left:
        print(f"error: {left} signal(s) could not be sent{done.error}", file=sys.stderr)
    if unreadable:
        print("error: the spool could not be read to the end (see above)", file=sys.stderr)
    return 1 if left or refused or unreadable else 0


def spool_main(args: argparse.Namespace) -> int:
    """Run ``spool status`` or ``spool drain``; return the exit code."""
    directory = Path(args.directory)
    if not (directory / DB_NAME).is_file():
        print(f"error: no spool in {directory} (no {DB_NAME} there)", file=sys.stderr)
        return 1
    if args.spool_command == "status":
        return asyncio.run(_status(directory))
    return asyncio.run(_drain(args, directory))
