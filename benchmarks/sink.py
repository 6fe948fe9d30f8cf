"""A minimal loopback ingest sink for the benchmarks, run as its own process.

It accepts any ``POST`` with 200 and counts the signals in the body without parsing it: every
signal object that both the SDK and the hand-written baselines send is compact JSON holding
``"appID":`` once, so counting that marker counts array elements. The peers measured beside
(posthog, segment) send events that each hold ``"event":`` once; those are counted apart, after
un-gzipping a compressed body. Validation belongs to the emulator (``python -m
telemetrydeck_async devserver``); here it would only make the sink, not the client, the
bottleneck. ``GET /count`` answers ``{"signals": n, "events": e, "requests": m}``.

Usage: ``python benchmarks/sink.py [--port N]``. It prints ``PORT <n>`` once it listens and
exits when its standard input closes (so it never outlives the benchmark that started it).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import sys
import threading

from aiohttp import web

MARKER = b'"appID":'
EVENT_MARKER = b'"event":'


class Counter:
    """Totals since the sink started."""

    def __init__(self) -> None:
        self.signals = 0
        self.events = 0
        self.requests = 0

    async def ingest(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip" or body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        self.signals += body.count(MARKER)
        self.events += body.count(EVENT_MARKER)
        self.requests += 1
        if request.path.startswith("/v2/"):
            # An empty 200, as this sink always answered: the SDK and the baselines only look
            # at the status.
            return web.Response(status=200)
        return web.json_response({"status": 1})  # the peers read a JSON answer

    async def count(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"signals": self.signals, "events": self.events, "requests": self.requests}
        )


async def serve(port: int) -> None:
    counter = Counter()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/count", counter.count)
    app.router.add_post("/{tail:.*}", counter.ingest)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=512)
    await site.start()
    server = site._server  # the bound port when port=0
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]  # asyncio.Server
    print(f"PORT {bound}", flush=True)

    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()

    def watch_stdin() -> None:
        # Blocks until the parent closes the pipe (or dies); then the sink stops.
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stdin_closed.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    await stdin_closed.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
