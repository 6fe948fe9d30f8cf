"""A separate process that uses the spool, for the multi-process tests in ``test_spool.py``.

Run as ``python tests/scripts/spool_worker.py MODE ARGS...``:

``hold DIR COUNT``
    Append COUNT records owned by this process (durability "always"), print one JSON line
    ``{"ids": [...]}`` and then sleep until killed: a worker that dies mid-flight.
``crunch DIR OUT SEED APPENDS``
    Append APPENDS records of its own in small batches while claiming, acking and now and
    then releasing records, until nothing is left to claim; write every acked body to OUT,
    one per line: one of several workers draining a shared spool.
``visit DIR``
    Open the spool and close it again: another worker coming and going.
``fsize DIR LIMIT``
    Cap this process's file size at LIMIT bytes (``RLIMIT_FSIZE``, the closest thing to a full
    disk without mounting one), append until writes fail, and print a JSON summary.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from telemetrydeck_async._spool import SpoolRecord, open_spool


async def hold(directory: str, count: int) -> None:
    spool = await open_spool(directory, durability="always")
    now = time.time()
    records = [SpoolRecord(now + i, b'{"hold":%d}' % i) for i in range(count)]
    result = await spool.append(records, claimed=True)
    print(json.dumps({"ids": list(result.ids), "owner": spool.owner_id}), flush=True)
    await asyncio.sleep(3600)  # killed by the test long before


async def crunch(directory: str, acked: TextIO, seed: int, appends: int) -> None:
    rng = random.Random(seed)
    spool = await open_spool(directory)
    appended = 0
    while True:
        if appended < appends:
            batch = min(rng.randint(1, 10), appends - appended)
            records = [
                SpoolRecord(time.time(), b'{"w":%d,"i":%d}' % (seed, appended + i))
                for i in range(batch)
            ]
            appended += len((await spool.append(records)).ids)
        claim = await spool.claim(rng.randint(1, 25))
        if claim.adopted:  # nobody dies in this test: worth a line in the failure report
            print(f"worker {seed} adopted {claim.adopted} records", file=sys.stderr, flush=True)
        if not claim.records:
            if appended >= appends:
                break
            continue
        if rng.random() < 0.1:
            await spool.release(record_id for record_id, _ in claim.records)
            continue
        # Written before the ack (a small local file): a crash could only duplicate, not lose.
        acked.writelines(body.decode() + "\n" for _, body in claim.records)
        acked.flush()
        await spool.ack(record_id for record_id, _ in claim.records)
    await spool.close()


async def visit(directory: str) -> None:
    spool = await open_spool(directory)
    await spool.close()


async def fsize(directory: str, limit: int) -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    spool = await open_spool(directory, durability="always")
    stored = failed = 0
    body = b'{"pad":"' + b"x" * 400 + b'"}'
    for _ in range(200):
        result = await spool.append([SpoolRecord(time.time(), body)] * 50)
        stored += len(result.ids)
        failed += result.failed
    claimed = len((await spool.claim(10)).records)
    status = await spool.status()
    await spool.close()
    summary = {
        "stored": stored,
        "failed": failed,
        "claimed": claimed,
        "disabled": spool.disabled,
        "status_records": status.records,
    }
    print(json.dumps(summary), flush=True)


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "hold":
        asyncio.run(hold(args[0], int(args[1])))
    elif mode == "crunch":
        with open(args[1], "w", encoding="utf-8") as acked:
            asyncio.run(crunch(args[0], acked, int(args[2]), int(args[3])))
    elif mode == "visit":
        asyncio.run(visit(args[0]))
    elif mode == "fsize":
        asyncio.run(fsize(args[0], int(args[1])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    os._exit(0)  # skip interpreter teardown: nothing left to flush, and it keeps tests fast


if __name__ == "__main__":
    main(sys.argv[1:])
