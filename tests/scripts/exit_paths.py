"""One way for a process to end while TelemetryClients hold signals (lifecycle/test_exit_paths.py).

Usage: exit_paths.py BASE_URL NAMESPACE SPOOL_DIR ENDING MOMENT LOOP COUNT [late]

Two clients run side by side, each sending COUNT signals (``Test.id`` 0..COUNT-1): ``spool``
with ``spool_dir=SPOOL_DIR`` to namespace ``NAMESPACE.spool``, and ``memory`` without a spool
to ``NAMESPACE.memory``. The program waits for MOMENT, then ends by ENDING:

* MOMENT ``queued``: right after the last ``signal()`` returns; ``inflight``: once both
  clients have requests in flight (the test points BASE_URL at an emulator that answers slowly).
* ENDING ``return``: ``asyncio.run()`` returns without ``aclose()``; ``exception``: an
  exception escapes ``async with``; ``keyboardinterrupt``: ``KeyboardInterrupt`` is raised in
  the main coroutine (no ``async with``); ``sysexit``: ``sys.exit(3)`` inside ``async with``;
  ``cancel``: the main task is cancelled inside ``async with``; ``sigint``: prints ``READY``
  and waits for the test's SIGINT (no ``async with``).
* LOOP ``asyncio`` or ``uvloop``.

The last lines printed are ``BOOKS <client> {json}``: each client's final stats and what its
``on_drop`` saw, printed by an ``atexit`` handler registered *before* the library is imported,
so it runs after the library's own exit hook (handlers run last-registered first). With
``late``, the handler is registered after the import, as an application's usually is, and runs
first: it closes each client with ``asyncio.run(client.aclose())`` (the documented way to read
final books at exit) before it prints them.
"""

from __future__ import annotations

import atexit
import json
import sys
from typing import Any

_clients: dict[str, Any] = {}
_drops: dict[str, dict[str, Any]] = {}
_late = sys.argv[8:] == ["late"]


def _print_books() -> None:
    for name, client in _clients.items():
        if _late:
            result = asyncio.run(client.aclose())  # the loop has ended: no network I/O
            print(f"CLOSED {name} {json.dumps(result.dropped)}", flush=True)
        s = client.stats
        books = {
            "enqueued": s.enqueued,
            "sent": s.sent,
            "spooled": s.spooled,
            "dropped": dict(s.dropped),
            "pending": s.pending,
            "on_drop": _drops[name]["by_reason"],
            "on_drop_ids": sorted(_drops[name]["ids"]),
        }
        print(f"BOOKS {name} {json.dumps(books)}", flush=True)


if not _late:
    atexit.register(_print_books)  # before the import below: runs after the library's hook

import asyncio  # noqa: E402  (after the atexit registration on purpose, see above)
import contextlib  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402

from telemetrydeck_async import TelemetryClient  # noqa: E402


def collector(name: str) -> Callable[[Sequence[Mapping[str, Any]], str], None]:
    """An ``on_drop`` that remembers the ids and reasons it was given."""
    seen: dict[str, Any] = {"ids": [], "by_reason": {}}
    _drops[name] = seen

    def on_drop(signals: Sequence[Mapping[str, Any]], reason: str) -> None:
        seen["ids"].extend(s["payload"]["Test.id"] for s in signals)
        seen["by_reason"][reason] = seen["by_reason"].get(reason, 0) + len(signals)

    return on_drop


async def reach(count: int, moment: str) -> None:
    for i in range(count):
        for td in _clients.values():
            await td.signal("Exit.case", payload={"Test.id": i})
    if moment == "inflight":
        for _ in range(4000):  # 20 s at most
            if all(td.stats.in_flight for td in _clients.values()):
                break
            await asyncio.sleep(0.005)
        assert all(td.stats.in_flight for td in _clients.values()), "nothing went in flight"


async def main(ending: str, moment: str, count: int) -> None:
    if ending in ("exception", "sysexit", "cancel"):
        async with contextlib.AsyncExitStack() as stack:
            for td in _clients.values():
                await stack.enter_async_context(td)
            await reach(count, moment)
            if ending == "exception":
                raise RuntimeError("the application failed")
            if ending == "sysexit":
                sys.exit(3)
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(1)  # the cancellation lands here
        return
    await reach(count, moment)
    if ending == "keyboardinterrupt":
        raise KeyboardInterrupt
    if ending == "sigint":
        print("READY", flush=True)
        await asyncio.sleep(30)  # the test sends SIGINT long before this ends
    # "return": the clients are left open.


def run() -> None:
    base_url, namespace, spool_dir, ending, moment, loop_name, count = sys.argv[1:8]
    for name, spool in (("spool", spool_dir), ("memory", None)):
        _clients[name] = TelemetryClient(
            "exit-app",
            namespace=f"{namespace}.{name}",
            base_url=base_url,
            default_user="exit-user",
            spool_dir=spool,
            on_drop=collector(name),
            flush_interval=60.0,
            close_timeout=0.5,
            request_timeout=30.0,
        )
    coro = main(ending, moment, int(count))
    if _late:
        atexit.register(_print_books)  # after the import: runs before the library's hook
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    run()
