"""Every way a process can end with signals in hand, in real processes, with the books checked.

The matrix: six endings (``asyncio.run()`` returning without ``aclose()``, an exception escaping
``async with``, ``KeyboardInterrupt``, ``sys.exit()`` inside ``async with``, the main task
cancelled, SIGINT from outside) x two moments (right after the last ``signal()`` returned;
with requests in flight to an emulator that answers slowly) x with and without a spool, on
the default event loop and on uvloop. Each case runs ``tests/scripts/exit_paths.py`` in a
child process against its own emulator on loopback; the child prints its final books.

* With a spool nothing is dropped, and every signal arrives once a second run (a client in
  this process on the same spool directory) has sent what the first one left.
* Without a spool every signal is sent (it is at the emulator) or dropped with a reason, and
  ``on_drop`` saw each dropped one.

The cases are independent (own emulator, namespace, spool directory), so they run a few at a
time; every wait is bounded and nothing asserts how long something took.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from telemetrydeck_async import TelemetryClient
from telemetrydeck_async.devserver import FaultPlan, IngestEmulator
from tests import _proc

ENDINGS = ("return", "exception", "keyboardinterrupt", "sysexit", "cancel", "sigint")
MOMENTS = ("queued", "inflight")
#: How each ending ends the child: its exit status (negative: killed by that signal).
EXIT_STATUS = {
    "return": 0,
    "exception": 1,
    "keyboardinterrupt": -signal.SIGINT,
    "sysexit": 3,
    "cancel": 1,
    "sigint": -signal.SIGINT,
}
#: Three batches of 100: two go in flight at once (max_concurrent_requests), one stays queued.
COUNT = 300
#: The slow emulator answers after this long: far beyond the child's life in every case.
SLOW = 5.0
#: Children running at once: they mostly wait on each other and on the emulators.
PARALLEL = 4
BOUND = 60.0


def received(emu: IngestEmulator, namespace: str) -> set[int]:
    """The distinct ``Test.id`` values the emulator has accepted for ``namespace``."""
    return {
        int(signal["payload"]["Test.id"])
        for batch, ns in zip(emu.batches, emu.namespaces, strict=True)
        if ns == namespace
        for signal in batch
    }


async def send_the_rest(emu: IngestEmulator, namespace: str, spool_dir: Path) -> None:
    """The next run: a client on the same spool directory sends what the first one left."""
    everything = set(range(COUNT))
    async with TelemetryClient(
        "exit-app",
        namespace=namespace,
        base_url=emu.base_url,
        default_user="exit-user",
        spool_dir=str(spool_dir),
    ):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOUND
        while not everything <= received(emu, namespace) and loop.time() < deadline:
            await emu.wait_for_signals(len(emu.signals) + 1, timeout=0.2)


def check_books(name: str, books: dict[str, Any] | None) -> list[str]:
    """What is wrong with one client's final books (empty: nothing)."""
    if books is None:
        return [f"{name}: no books printed"]
    problems = []
    dropped = sum(books["dropped"].values())
    if books["enqueued"] != COUNT or books["pending"] != 0:
        problems.append(f"{name}: not everything accepted, or something left pending")
    if books["enqueued"] != books["sent"] + books["spooled"] + dropped:
        problems.append(f"{name}: the books do not balance")
    return problems


async def run_case(
    tmp_path: Path, loop_name: str, ending: str, moment: str
) -> tuple[str, dict[str, Any], list[str]]:
    """Run one ending (two clients: spool, memory); return the books and what went wrong."""
    name = f"{ending}/{moment}/{loop_name}"
    namespace = f"exit.{ending}.{moment}"
    spool_dir = tmp_path / namespace
    faults = FaultPlan(delay=SLOW if moment == "inflight" else 0.0)
    async with IngestEmulator(host="127.0.0.1", port=0, faults=faults) as emu:
        proc = await _proc.start(
            str(_proc.SCRIPTS / "exit_paths.py"),
            emu.base_url,
            namespace,
            str(spool_dir),
            ending,
            moment,
            loop_name,
            str(COUNT),
        )
        try:
            if ending == "sigint":
                await proc.wait_for("^READY", timeout=BOUND)
                proc.send_signal(signal.SIGINT)
            status = await proc.finish(timeout=BOUND)
        finally:
            await proc.kill()
        books: dict[str, Any] = {
            line.split()[1]: json.loads(line.split(maxsplit=2)[2])
            for line in proc.out
            if line.startswith("BOOKS ")
        }
        problems = [f"exit status {status}"] if status != EXIT_STATUS[ending] else []
        problems += check_books("spool", books.get("spool"))
        problems += check_books("memory", books.get("memory"))
        if problems:
            return name, books, [*problems, proc.output]
        everything = set(range(COUNT))
        # Without a spool: each signal is at the emulator (sent), or on_drop saw it dropped.
        memory = books["memory"]
        seen = memory["on_drop_ids"]
        if memory["on_drop"] != memory["dropped"] or len(seen) != len(set(seen)):
            problems.append("memory: on_drop did not see each dropped signal once")
        if len(seen) != sum(memory["dropped"].values()) or memory["spooled"]:
            problems.append("memory: dropped signals on_drop never saw, or spooled")
        missing = everything - set(seen) - received(emu, f"{namespace}.memory")
        if missing:
            problems.append(f"memory: {len(missing)} neither sent nor dropped with a reason")
        # With a spool: nothing dropped, and the next run delivers everything.
        spooled = books["spool"]
        if spooled["dropped"] or spooled["on_drop"]:
            problems.append("spool: dropped with a spool configured")
        emu.faults.delay = 0.0
        await send_the_rest(emu, f"{namespace}.spool", spool_dir)
        missing = everything - received(emu, f"{namespace}.spool")
        if missing:
            problems.append(f"spool: {len(missing)} never arrived after the next run")
        return name, books, [*problems, proc.output] if problems else []


@pytest.mark.slow
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
async def test_no_signal_is_lost_whichever_way_the_process_ends(
    tmp_path: Path, loop_name: str
) -> None:
    """12 endings per event loop, two clients each: every signal sent, spooled, or told dropped."""
    if loop_name == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not available on this platform")
    gate = asyncio.Semaphore(PARALLEL)

    async def guarded(ending: str, moment: str) -> tuple[str, Any, list[str]]:
        async with gate:
            return await run_case(tmp_path, loop_name, ending, moment)

    cases = itertools.product(ENDINGS, MOMENTS)
    results = await asyncio.gather(*(guarded(*case) for case in cases))
    for name, books, _ in results:  # the figures docs/delivery.md quotes (pytest -s shows them)
        for client, b in books.items():
            print(f"{name:32} {client:6} sent={b['sent']} spooled={b['spooled']} {b['dropped']}")
    failures = [f"{name}: " + "\n".join(problems) for name, _, problems in results if problems]
    assert not failures, "\n\n".join(failures)


async def test_an_atexit_handler_of_the_application_reads_final_books_through_aclose(
    tmp_path: Path,
) -> None:
    """A handler registered after the import runs first: asyncio.run(aclose()) settles the books."""
    async with IngestEmulator(host="127.0.0.1", port=0) as emu:
        proc = await _proc.start(
            str(_proc.SCRIPTS / "exit_paths.py"),
            emu.base_url,
            "exit.late",
            str(tmp_path / "spool"),
            "return",
            "queued",
            "asyncio",
            str(COUNT),
            "late",
        )
        try:
            assert await proc.finish(timeout=BOUND) == 0, proc.output
        finally:
            await proc.kill()
    assert "CLOSED spool {}" in proc.out, proc.output
    assert f'CLOSED memory {{"shutdown": {COUNT}}}' in proc.out, proc.output
    books = {
        line.split()[1]: json.loads(line.split(maxsplit=2)[2])
        for line in proc.out
        if line.startswith("BOOKS ")
    }
    assert (books["spool"]["spooled"], books["spool"]["pending"]) == (COUNT, 0)
    assert books["memory"]["dropped"] == books["memory"]["on_drop"] == {"shutdown": COUNT}
    assert books["memory"]["pending"] == 0
    # The library's own hook found the clients closed: nothing was reported twice.
    assert sum("dropped" in line for line in proc.err) == 1, proc.output
