"""A client that has sent once and has signals queued, then os.fork() on its running loop.

argv: BASE_URL. The child checks it starts clean, sends ids 100..102 and closes; the parent
waits for the child, then closes (ids 1..5 were queued before the fork). Both print a JSON
line: CHILD {...} / PARENT {...}.
"""

import asyncio
import json
import os
import signal
import sys
import warnings

from telemetrydeck_async import TelemetryClient

# Python 3.12+ warns that forking a process with threads may deadlock; this test does it on
# purpose (aiohttp's resolver threads are idle at that point).
warnings.simplefilter("ignore", DeprecationWarning)


def report(tag: str, td: TelemetryClient, **extra: object) -> None:
    stats = td.stats
    data = {
        "pid": os.getpid(),
        "session": td.session_id,
        "enqueued": stats.enqueued,
        "queue_depth": stats.queue_depth,
        **extra,
    }
    print(tag, json.dumps(data), flush=True)


async def child(td: TelemetryClient) -> None:
    report("CHILD-START", td, sigterm_default=signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    for i in range(100, 103):
        await td.signal("Fork.Child.tick", payload={"Test.id": i})
    result = await td.aclose()
    report("CHILD", td, sent=result.sent, dropped=dict(result.dropped))


async def main() -> None:
    td = TelemetryClient(
        "test-app",
        namespace="com.example",
        base_url=sys.argv[1],
        default_user="fork-user",
        flush_interval=60,
    )
    td.install_signal_handlers()  # the child must not keep them: they close the parent's loop
    await td.signal("Fork.Parent.tick", payload={"Test.id": 0})
    await td.flush()  # the parent now has a live HTTP session and connection
    for i in range(1, 6):
        await td.signal("Fork.Parent.tick", payload={"Test.id": i})
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            asyncio.run(child(td))
        except BaseException as exc:
            print("CHILD-ERROR", repr(exc), flush=True)
            code = 1
        os._exit(code)
    _, status = await asyncio.get_running_loop().run_in_executor(None, os.waitpid, pid, 0)
    result = await td.aclose()
    report("PARENT", td, sent=result.sent, child_status=status)


asyncio.run(main())
