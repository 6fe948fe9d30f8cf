"""An app that owns its loop, installs the client's signal handlers and waits to be stopped.

argv: BASE_URL COUNT [CLOSE_TIMEOUT]. Prints READY once COUNT signals are queued; exits 3 if
never stopped. Logs at INFO to stderr, so the test sees when a signal was handled.
"""

import asyncio
import logging
import sys

from telemetrydeck_async import TelemetryClient


async def main() -> None:
    td = TelemetryClient(
        "test-app",
        namespace="com.example",
        base_url=sys.argv[1],
        default_user="app-user",
        flush_interval=60,
        close_timeout=float(sys.argv[3]) if len(sys.argv) > 3 else 10.0,
    )
    await td.start()
    td.install_signal_handlers()
    for i in range(int(sys.argv[2])):
        await td.signal("App.Work.done", payload={"Test.id": i})
    print("READY", flush=True)
    await asyncio.sleep(60)
    sys.exit(3)


logging.basicConfig(level=logging.INFO)
asyncio.run(main())
