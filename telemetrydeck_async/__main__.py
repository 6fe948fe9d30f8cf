"""The command line: ``python -m telemetrydeck_async`` (also installed as ``telemetrydeck-async``).

Commands:
    demo        run the local ingest emulator and send a few thousand signals through it
    send        send one signal and report whether it was delivered
    devserver   run the local ingest emulator (with optional injected faults)
    spool       inspect (status) or empty (drain) an on-disk spool directory
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from ._client import TelemetryClient
from ._config import DEFAULT_BASE_URL, is_loopback
from ._health import describe_wait
from ._retry import RetryPolicy
from ._version import __version__
from .exceptions import TelemetryDeckError

__all__ = ["main"]

_DEMO_TYPES = (
    "App.launched",
    "Checkout.Payment.completed",
    "Search.query",
    "Settings.themeChanged",
)


def _print_table(rows: Sequence[tuple[str, str]], title: str) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    print("-" * (width + 14))
    for key, value in rows:
        print(f"{key:<{width}}  {value:>10}")


class _DemoEvents(logging.Handler):
    """Prints what the client does, one line per event as it happens, with the time since start.

    Every retry is a line of its own (the client's WARNING about retries is rate-limited, so
    the demo shows the DEBUG event behind it instead); other warnings and errors are shown
    as they are.
    """

    def __init__(self, started: float) -> None:
        super().__init__(logging.DEBUG)
        self.started = started

    def line(self, text: str) -> None:
        print(f"  {time.perf_counter() - self.started:6.2f} s  {text}", flush=True)

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "telemetrydeck_event", None)
        if event == "retry":
            exc = record.args[0] if isinstance(record.args, tuple) and record.args else None
            status = getattr(exc, "status", None)
            why = f"HTTP {status}" if status is not None else str(exc)
            wait = describe_wait(getattr(record, "telemetrydeck_wait", 0.0))
            self.line(f"request refused ({why}); backing off, retry in {wait}")
        elif record.levelno >= logging.WARNING and not record.msg.startswith("request to the"):
            self.line(f"{record.levelname}: {record.getMessage()}")


async def _demo(count: int, fail_next: int, outage: float, verbose: bool) -> int:
    # Imported here so `send` does not pay for the emulator's imports.
    from .devserver import FaultPlan, IngestEmulator

    emulator = IngestEmulator(
        faults=FaultPlan(fail_next=fail_next, fail_status=503), id_key="Demo.index"
    )
    async with emulator:
        print(f"local ingest emulator on {emulator.base_url} (first {fail_next} requests get 503)")
        if outage:
            print(f"half-way through, the emulator answers 503 to everything for {outage:g} s")
        print("what happens, as it happens:")
        started = time.perf_counter()
        events = _DemoEvents(started)
        package_log = logging.getLogger("telemetrydeck_async")
        level = package_log.level
        if not verbose:  # with -v the full log is shown instead
            package_log.setLevel(logging.DEBUG)
            package_log.addHandler(events)
            package_log.propagate = False
        outage_task: asyncio.Task[None] | None = None

        async def outage_window() -> None:
            events.line(f"outage begins: every request gets 503 for {outage:g} s")
            emulator.faults.status_always = 503
            await asyncio.sleep(outage)
            emulator.faults.status_always = None
            events.line("outage over: the emulator accepts requests again")

        async with TelemetryClient(
            "demo-app-id",
            namespace="com.example.demo",
            base_url=emulator.base_url,
            salt="demo-salt",
            test_mode=True,
            flush_interval=0.5,
            retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.5, deadline=30.0),
        ) as td:
            for i in range(count):
                if i % 100 == 0:
                    await asyncio.sleep(
                        0.002
                    )  # a service's natural pauses: batches leave as they fill
                if outage and i == count // 2:
                    outage_task = asyncio.ensure_future(outage_window())
                signal_type = _DEMO_TYPES[i % len(_DEMO_TYPES)]
                await td.signal(
                    signal_type,
                    client_user=f"user-{i % 50}",
                    payload={"Demo.index": i, "Demo.even": i % 2 == 0},
                    float_value=(i % 100) / 10 if signal_type.startswith("Checkout") else None,
                )
            if outage_task is not None:
                await outage_task
            result = await td.flush()
            stats = td.stats
        events.line(
            f"flushed: {stats.sent} sent, {stats.dropped_total} dropped, {stats.pending} pending"
        )
        package_log.removeHandler(events)
        package_log.setLevel(level)
        package_log.propagate = True
        elapsed = time.perf_counter() - started
        received = emulator.count_by_type()
        rows = [(t, str(received.get(t, 0))) for t in _DEMO_TYPES]
        rows += [
            ("signals received", str(len(emulator.signals))),
            ("requests (batches) accepted", str(len(emulator.batches))),
            ("requests refused (503)", str(sum(r.status == 503 for r in emulator.requests))),
            ("requests retried", str(stats.retried_requests)),
            ("signals dropped", str(stats.dropped_total)),
            ("time taken", f"{elapsed:.2f} s"),
        ]
        print()
        _print_table(rows, "what the emulator received")
        lost = count - len(emulator.distinct_ids())
    if lost or result.dropped_total or result.pending:
        print(f"\nFAILED: {lost} signal(s) missing at the emulator", file=sys.stderr)
        return 1
    print(f"\nall {count} signals delivered.")
    return 0


def _parse_payload(items: Sequence[str]) -> dict[str, str | int | float | bool]:
    payload: dict[str, str | int | float | bool] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise TelemetryDeckError(f"--payload expects KEY=VALUE, got {item!r}")
        value: str | int | float | bool = raw
        if raw in ("true", "false"):
            value = raw == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    continue
        payload[key] = value
    return payload


def _unused_network_options(args: argparse.Namespace) -> list[str]:
    """Notes for --proxy/--ssl given where they cannot apply: a check that checked nothing."""
    url = urllib.parse.urlsplit(args.base_url or DEFAULT_BASE_URL)
    notes = []
    if args.proxy and is_loopback(url.hostname or ""):
        notes.append(
            "note: --proxy is not used: a loopback --base-url is always reached directly, "
            "so this run does not test the proxy"
        )
    if args.ssl and url.scheme == "http":
        notes.append(
            "note: --ssl is not used: the --base-url is http://, so this run does not test "
            "the CA bundle"
        )
    return notes


async def _send(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    for option in ("base_url", "proxy", "ssl"):
        if getattr(args, option):
            options[option] = getattr(args, option)
    async with TelemetryClient(
        args.app_id,
        namespace=args.namespace,
        test_mode=args.test_mode,
        request_timeout=args.timeout,
        retry=RetryPolicy(deadline=args.timeout, max_backoff=min(30.0, args.timeout)),
        close_timeout=args.timeout + 5,
        **options,
    ) as td:
        for note in _unused_network_options(args):  # the options are valid by now
            print(note, file=sys.stderr)
        await td.signal(
            args.type,
            client_user=args.user,
            payload=_parse_payload(args.payload),
            float_value=args.float_value,
        )
        result = await td.flush(timeout=args.timeout + 5)
        last = td.stats.last_error
    if result.sent == 1:
        print(f"delivered {args.type!r}")
        return 0
    why = ", ".join(f"{k}" for k in result.dropped) or ("pending" if result.pending else "unknown")
    detail = f": {last.type}: {last.message}" if last is not None else ""
    print(f"not delivered ({why}){detail}", file=sys.stderr)
    return 1


def _build_parser() -> argparse.ArgumentParser:
    from .devserver import add_devserver_arguments

    parser = argparse.ArgumentParser(
        prog="telemetrydeck-async",
        description="TelemetryDeck Ingest API v2 client: demo, one-off sends, local emulator.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="send signals through the local emulator")
    demo.add_argument("--count", type=int, default=4000, help="signals to send (4000)")
    demo.add_argument(
        "--fail-next", type=int, default=3, help="503 answers to inject first, to show retries"
    )
    demo.add_argument(
        "--outage",
        type=float,
        default=1.0,
        help="seconds of 503-only answers half-way through, to show backoff (1; 0: none)",
    )

    send = commands.add_parser("send", help="send one signal; non-zero exit if not delivered")
    send.add_argument("type", help="the signal type, e.g. App.launched")
    send.add_argument("--app-id", required=True, help="the app ID from the dashboard")
    send.add_argument("--namespace", help="your namespace, e.g. com.example")
    send.add_argument("--user", default="cli-user", help="user id (hashed before sending)")
    send.add_argument(
        "--payload", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    send.add_argument("--float-value", type=float, help="the signal's floatValue")
    send.add_argument("--test-mode", action="store_true", help="mark the signal as test data")
    send.add_argument("--base-url", help="ingest server (default: TelemetryDeck's)")
    send.add_argument("--timeout", type=float, default=15.0, help="seconds to try (15)")
    send.add_argument(
        "--proxy",
        metavar="URL",
        help="http://[user:password@]host:port (default: HTTPS_PROXY / NO_PROXY)",
    )
    send.add_argument(
        "--ssl",
        metavar="CA_BUNDLE",
        help="a PEM file of CA certificates to trust (a private CA, a TLS-inspecting proxy)",
    )

    devserver = commands.add_parser("devserver", help="run the local ingest emulator")
    add_devserver_arguments(devserver)

    from ._spool_cli import add_spool_commands

    add_spool_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return asyncio.run(_demo(args.count, args.fail_next, args.outage, args.verbose))
        if args.command == "send":
            return asyncio.run(_send(args))
        if args.command == "spool":
            from ._spool_cli import spool_main

            return spool_main(args)
        if args.command == "devserver":
            from .devserver import devserver_main

            return devserver_main(args)
    except (TelemetryDeckError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover  # parser.error exits


if __name__ == "__main__":
    sys.exit(main())
