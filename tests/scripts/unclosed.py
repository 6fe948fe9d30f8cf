"""Queue signals and let asyncio.run() end without closing the client.

argv: BASE_URL COUNT [SPOOL_DIR|-] [BATCH_SIZE]. With a batch size below COUNT, a full batch
is in flight (the test's emulator holds requests) when the loop ends.
"""

import asyncio
import sys

from telemetrydeck_async import TelemetryClient


async def main() -> None:
    base_url, count = sys.argv[1], int(sys.argv[2])
    spool_dir = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    batch_size = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    td = TelemetryClient(
        "test-app",
        namespace="com.example",
        base_url=base_url,
        default_user="script-user",
        flush_interval=60,
        batch_size=batch_size,
        spool_dir=spool_dir,
    )
    for i in range(count):
        await td.signal("Script.Run.tick", payload={"Test.id": i})
    if batch_size < count:
        for _ in range(200):  # let the full batch leave (bounded: 2 s)
            if td.stats.in_flight:
                break
            await asyncio.sleep(0.01)
    print(f"QUEUED in_flight={td.stats.in_flight} queued={td.stats.queue_depth}", flush=True)


asyncio.run(main())
