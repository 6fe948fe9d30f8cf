"""Lifecycle: bounded shutdown, the exit hook, OS signal handlers and fork(), with real processes.

Every wait is bounded by a generous outer timeout; nothing asserts how long something took.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import sqlite3
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

from telemetrydeck_async import FlushResult, TelemetryClient, WrongEventLoopError, _lifecycle
from telemetrydeck_async._lifecycle import track
from telemetrydeck_async._spool import DB_NAME, open_spool
from telemetrydeck_async.devserver import IngestEmulator
from tests import _proc
from tests.helpers import ClientFactory, balanced

#: The outer bound of every wait for a close: far above any budget used here.
BOUND = 30.0


async def run_script(procs: list[_proc.Proc], *args: str) -> _proc.Proc:
    """Start ``tests/scripts/<args[0]>`` with the rest as its arguments."""
    proc = await _proc.start(str(_proc.SCRIPTS / args[0]), *args[1:])
    procs.append(proc)
    return proc


async def spooled_ids(spool_dir: Path) -> list[int]:
    """The ``Test.id`` of every record in the spool at ``spool_dir``, sorted."""
    spool = await open_spool(spool_dir)
    try:
        claimed = await spool.claim(100_000)
    finally:
        await spool.close()
    return sorted(json.loads(body)["payload"]["Test.id"] for _, body in claimed.records)


def run_on_a_loop_that_ends(td: TelemetryClient, count: int) -> None:
    """Queue ``count`` signals (ids 0..count-1) on a loop in a thread, which then ends."""

    async def queue() -> None:
        await td.start()
        for i in range(count):
            await td.signal("App.tick", payload={"Test.id": i})

    thread = threading.Thread(target=asyncio.run, args=(queue(),))
    thread.start()
    thread.join(BOUND)


# ----------------------------------------------------------------------------- aclose()


async def test_aclose_returns_and_drops_with_reason_shutdown_when_the_server_never_answers(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A server that never answers cannot hold aclose() past its timeout; nothing goes missing."""
    emulator.faults.delay = 60
    td = make_client(request_timeout=30)
    for i in range(10):
        await td.signal("App.tick", payload={"Test.id": i})
    result = await asyncio.wait_for(td.aclose(timeout=0.5), BOUND)
    assert (result.sent, result.spooled, dict(result.dropped), result.pending) == (
        0,
        0,
        {"shutdown": 10},
        0,
    )
    assert balanced(td.stats)


async def test_aclose_accounts_in_flight_and_queued_signals_on_a_stalled_server(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Batches stuck in a request and batches still queued are all counted as dropped."""
    emulator.faults.delay = 60
    td = make_client(request_timeout=30, batch_size=5, max_concurrent_requests=1)
    for i in range(15):
        await td.signal("App.tick", payload={"Test.id": i})
    await td.flush(timeout=0.2)  # one batch goes out and hangs; two stay queued
    assert td.stats.in_flight == 5
    result = await asyncio.wait_for(td.aclose(timeout=0.5), BOUND)
    assert dict(result.dropped) == {"shutdown": 15}
    assert td.stats.pending == 0
    assert balanced(td.stats)


async def test_concurrent_aclose_calls_share_one_close(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Two aclose() calls at once both return the result of the single close."""
    emulator.faults.delay = 60
    td = make_client(request_timeout=30)
    await td.signal("App.tick", payload={"Test.id": 1})
    first, second = await asyncio.wait_for(
        asyncio.gather(td.aclose(timeout=0.5), td.aclose(timeout=0.5)), BOUND
    )
    assert first is second
    assert dict(first.dropped) == {"shutdown": 1}


async def test_a_cancelled_aclose_does_not_hang_the_next_one(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Cancelling the caller of aclose() leaves the close running; the next call gets its result."""
    emulator.faults.delay = 60
    td = make_client(request_timeout=30)
    for i in range(4):
        await td.signal("App.tick", payload={"Test.id": i})
    waiter = asyncio.ensure_future(td.aclose(timeout=1.0))
    await asyncio.sleep(0.1)
    waiter.cancel()
    result = await asyncio.wait_for(td.aclose(), BOUND)
    assert dict(result.dropped) == {"shutdown": 4}
    assert balanced(td.stats)


async def test_aclose_on_a_new_loop_after_the_old_one_ended_drops_what_was_left(
    emulator: IngestEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A client whose loop has ended is closed from another loop without network I/O."""
    td = TelemetryClient(
        "test-app", base_url=emulator.base_url, default_user="u", flush_interval=60
    )
    run_on_a_loop_that_ends(td, 3)
    result = await asyncio.wait_for(td.aclose(), BOUND)
    assert dict(result.dropped) == {"shutdown": 3}
    assert "dropped 3 signal(s), reason shutdown" in caplog.text
    assert emulator.signals == []


async def test_aclose_from_another_running_loop_raises_wrong_event_loop(
    make_client: ClientFactory,
) -> None:
    """Closing a client whose loop still runs, from a different loop, is refused clearly."""
    td = make_client()
    await td.start()
    errors: list[BaseException] = []

    def close_elsewhere() -> None:
        try:
            asyncio.run(td.aclose())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=close_elsewhere)
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, thread.join, BOUND)
    assert len(errors) == 1
    assert isinstance(errors[0], WrongEventLoopError)
    assert not td.closed


# ----------------------------------------------------------------------------- signal handlers


async def test_aclose_puts_the_previous_signal_handlers_back(make_client: ClientFactory) -> None:
    """Handlers installed by install_signal_handlers() are removed again by aclose()."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    td = make_client()
    await td.start()
    td.install_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) is not before[0]
    await asyncio.wait_for(td.aclose(), BOUND)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


async def test_sigterm_closes_the_client_then_ends_the_process_by_sigterm(
    emulator: IngestEmulator, procs: list[_proc.Proc]
) -> None:
    """SIGTERM flushes every queued signal, then the process dies of SIGTERM as by default."""
    proc = await run_script(procs, "sigterm_app.py", emulator.base_url, "25")
    await proc.wait_for("^READY")
    proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == -signal.SIGTERM, proc.output
    assert emulator.distinct_ids() == set(range(25))


async def test_sigint_closes_the_client_then_raises_keyboard_interrupt(
    emulator: IngestEmulator, procs: list[_proc.Proc]
) -> None:
    """SIGINT flushes every queued signal, then KeyboardInterrupt ends asyncio.run() as usual."""
    proc = await run_script(procs, "sigterm_app.py", emulator.base_url, "25")
    await proc.wait_for("^READY")
    proc.send_signal(signal.SIGINT)
    assert await proc.finish() == -signal.SIGINT, proc.output
    assert "KeyboardInterrupt" in proc.output
    assert emulator.distinct_ids() == set(range(25))


# ----------------------------------------------------------------------------- exit hook


async def test_unclosed_client_without_spool_logs_how_many_signals_were_lost(
    emulator: IngestEmulator, procs: list[_proc.Proc]
) -> None:
    """asyncio.run() ending with the client open: the exit hook logs the count it lost."""
    proc = await run_script(procs, "unclosed.py", emulator.base_url, "7")
    assert await proc.finish() == 0, proc.output
    assert any("dropped 7 signal(s), reason shutdown" in line for line in proc.err), proc.output
    assert emulator.signals == []


async def test_unclosed_client_with_spool_writes_queued_signals_to_disk(
    emulator: IngestEmulator, procs: list[_proc.Proc], tmp_path: Path
) -> None:
    """With a spool, the exit hook writes every queued signal to disk and logs no loss."""
    spool_dir = tmp_path / "spool"
    proc = await run_script(procs, "unclosed.py", emulator.base_url, "7", str(spool_dir))
    assert await proc.finish() == 0, proc.output
    assert "lost" not in proc.output
    assert await spooled_ids(spool_dir) == list(range(7))


async def test_unclosed_client_with_spool_keeps_the_batch_that_was_in_flight(
    emulator: IngestEmulator, procs: list[_proc.Proc], tmp_path: Path
) -> None:
    """A request cut off by the loop's end loses nothing: its batch is spooled with the rest."""
    emulator.faults.delay = 60  # the full batch is in flight when asyncio.run() ends
    spool_dir = tmp_path / "spool"
    proc = await run_script(procs, "unclosed.py", emulator.base_url, "150", str(spool_dir), "100")
    assert await proc.finish() == 0, proc.output
    assert "in_flight=100" in proc.out[-1], proc.output
    assert await spooled_ids(spool_dir) == list(range(150))


async def test_next_run_sends_what_the_exit_hook_spooled(
    emulator: IngestEmulator, procs: list[_proc.Proc], tmp_path: Path
) -> None:
    """Signals spooled at the exit of one run are delivered by the next client on that spool."""
    spool_dir = tmp_path / "spool"
    proc = await run_script(procs, "unclosed.py", emulator.base_url, "7", str(spool_dir))
    assert await proc.finish() == 0, proc.output
    async with TelemetryClient(
        "test-app",
        namespace="com.example",  # the script's destination: another one would leave them
        base_url=emulator.base_url,
        default_user="u",
        spool_dir=str(spool_dir),
    ) as td:
        await td.flush(timeout=BOUND)
        assert await emulator.wait_for_signals(7, timeout=BOUND)
    assert emulator.distinct_ids() == set(range(7))


# ----------------------------------------------------------------------------- fork


async def run_fork_script(
    procs: list[_proc.Proc], emulator: IngestEmulator
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Run scripts/forking.py; return its CHILD-START, CHILD and PARENT reports."""
    proc = await run_script(procs, "forking.py", emulator.base_url)
    assert await proc.finish() == 0, proc.output
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.out if " {" in line}
    start, child, parent = (json.loads(lines[k]) for k in ("CHILD-START", "CHILD", "PARENT"))
    return start, child, parent


async def test_forked_child_starts_clean_and_nothing_is_sent_twice(
    emulator: IngestEmulator, procs: list[_proc.Proc]
) -> None:
    """After os.fork() the child has an empty queue and its own session; each side sends its own."""
    start, child, parent = await run_fork_script(procs, emulator)
    assert (start["enqueued"], start["queue_depth"]) == (0, 0)
    assert child["sent"] == 3
    assert parent["sent"] == 5
    assert parent["child_status"] == 0
    assert child["session"] != parent["session"]
    assert emulator.distinct_ids() == {0, 1, 2, 3, 4, 5, 100, 101, 102}
    assert emulator.duplicates() == 0
    sessions = {s["payload"]["Test.id"]: s["sessionID"] for s in emulator.signals}
    assert {sessions[i] for i in (100, 101, 102)} == {child["session"]}


async def test_exit_hook_result_reaches_a_client_that_is_still_alive(
    emulator: IngestEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The exit hook's salvage marks a live client closed with the result it reports."""
    from telemetrydeck_async import _lifecycle

    td = TelemetryClient(
        "test-app", base_url=emulator.base_url, default_user="u", flush_interval=60
    )
    run_on_a_loop_that_ends(td, 2)
    ticket = td._exit_ticket
    assert ticket is not None
    with caplog.at_level(logging.WARNING, logger="telemetrydeck_async"):
        _lifecycle.finish_at_exit([ticket])
    assert td.closed
    result = await td.aclose()
    assert result == FlushResult(sent=0, spooled=0, dropped={"shutdown": 2}, pending=0)
    assert "dropped 2 signal(s), reason shutdown" in caplog.text


async def test_forked_child_does_not_keep_the_parents_signal_handlers(
    emulator: IngestEmulator, procs: list[_proc.Proc]
) -> None:
    """Handlers the parent installed (they close the parent's client) are reset in the child."""
    start, _, _ = await run_fork_script(procs, emulator)
    assert start["sigterm_default"] is True


async def test_a_second_sigterm_during_the_close_exits_at_once(
    emulator: IngestEmulator, procs: list[_proc.Proc]
) -> None:
    """During a close stuck on a stalled server, a second SIGTERM ends the process at once."""
    emulator.faults.delay = 60
    proc = await run_script(procs, "sigterm_app.py", emulator.base_url, "5", "600")
    await proc.wait_for("^READY")
    proc.send_signal(signal.SIGTERM)
    await proc.wait_for("received SIGTERM: closing", stream="err")
    proc.send_signal(signal.SIGTERM)
    assert await proc.finish() == -signal.SIGTERM, proc.output
    assert "received SIGTERM again" in proc.output


async def test_exit_hook_closes_a_client_whose_loop_still_runs_in_another_thread(
    emulator: IngestEmulator,
) -> None:
    """At exit, a client on a loop in a (daemon) thread gets a real close: its signals are sent."""
    from telemetrydeck_async import _lifecycle

    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    try:
        td = TelemetryClient(
            "test-app", base_url=emulator.base_url, default_user="u", flush_interval=60
        )
        asyncio.run_coroutine_threadsafe(td.start(), other).result(BOUND)
        for i in range(3):
            td.signal_threadsafe("App.tick", payload={"Test.id": i})
        ticket = td._exit_ticket
        assert ticket is not None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _lifecycle.finish_at_exit, [ticket])
        assert td.closed
        assert emulator.distinct_ids() == {0, 1, 2}
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(BOUND)
        other.close()


async def test_signals_lost_at_exit_are_passed_to_on_drop(emulator: IngestEmulator) -> None:
    """The exit salvage hands the signals it drops to on_drop, with reason shutdown."""
    dropped: list[tuple[list[int], str]] = []
    td = TelemetryClient(
        "test-app",
        base_url=emulator.base_url,
        default_user="u",
        flush_interval=60,
        on_drop=lambda signals, reason: dropped.append(
            ([s["payload"]["Test.id"] for s in signals], reason)
        ),
    )
    run_on_a_loop_that_ends(td, 3)
    await asyncio.wait_for(td.aclose(), BOUND)
    assert dropped == [([0, 1, 2], "shutdown")]


async def test_exit_salvage_counts_what_the_spool_could_not_take(
    emulator: IngestEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spool that cannot be written at exit: the signals are counted as spool_error, and said."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    td = TelemetryClient(
        "test-app",
        base_url=emulator.base_url,
        default_user="u",
        flush_interval=60,
        spool_dir=str(blocker / "spool"),
    )
    run_on_a_loop_that_ends(td, 3)
    result = await asyncio.wait_for(td.aclose(), BOUND)
    assert dict(result.dropped) == {"spool_error": 3}
    assert "dropped 3 signal(s), reason spool_error" in caplog.text
    assert balanced(td.stats)


async def test_exit_hook_forgets_unclosed_clients_with_nothing_left_to_save(
    make_client: ClientFactory,
) -> None:
    """A client left open on an ended loop with an empty queue is not held until exit."""
    from telemetrydeck_async import _lifecycle

    empty = make_client()
    run_on_a_loop_that_ends(empty, 0)
    holding = make_client()
    run_on_a_loop_that_ends(holding, 2)
    await make_client().start()  # registering a client prunes the registry
    assert empty._exit_ticket is not None
    assert empty._exit_ticket not in _lifecycle._open
    assert holding._exit_ticket in _lifecycle._open


async def test_exit_salvage_opens_a_spool_that_never_opened_without_a_thread_or_loop(
    emulator: IngestEmulator, tmp_path: Path
) -> None:
    """Salvage with no spool open writes it in the calling thread (no thread) and closes it."""
    spool_dir = tmp_path / "spool"
    td = TelemetryClient(
        "test-app",
        base_url=emulator.base_url,
        default_user="u",
        flush_interval=60,
        spool_dir=str(spool_dir),
    )

    async def queue_without_yielding() -> None:
        # No await: the loop ends before the spool-opening task has run a single step.
        for i in range(3):
            td.signal_nowait("App.tick", payload={"Test.id": i})

    threads_before = set(threading.enumerate())
    thread = threading.Thread(target=asyncio.run, args=(queue_without_yielding(),))
    thread.start()
    thread.join(BOUND)
    assert td._flusher.spool is None  # its open was cancelled with the loop
    started: list[str] = []
    start = threading.Thread.start

    def record_start(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threading.Thread, "start", record_start)
        result = await asyncio.wait_for(td.aclose(), BOUND)
    assert result == FlushResult(sent=0, spooled=3, dropped={}, pending=0)
    assert started == []
    # No owner is left open; the cancelled open closes its own from its thread: wait for it.
    for worker in set(threading.enumerate()) - threads_before:
        if worker.name.startswith("telemetrydeck-spool-"):
            worker.join(BOUND)
    assert owners_open(spool_dir) == 0
    assert await spooled_ids(spool_dir) == [0, 1, 2]


def owners_open(spool_dir: Path) -> int:
    """Owners of the spool at ``spool_dir`` not marked closed."""
    with contextlib.closing(sqlite3.connect(spool_dir / DB_NAME)) as db:
        (count,) = db.execute("SELECT count(*) FROM owners WHERE closed = 0").fetchone()
    return int(count)


class _Owner:
    """Something that hands the lifecycle a fork hook."""


def test_fork_hooks_hold_their_owner_weakly() -> None:
    """track() keeps no object alive: once its owner is collected, its fork hook is gone."""
    reset: list[_Owner] = []
    owner = _Owner()
    track(owner, reset.append)
    assert _lifecycle._fork_hooks[owner] == reset.append
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is None
    assert not any(isinstance(o, _Owner) for o in _lifecycle._fork_hooks)
    assert reset == []


def test_lifecycle_imports_nothing_above_it() -> None:
    """_lifecycle talks to the pipeline through its protocol: no import of the client or flusher."""
    import ast

    import telemetrydeck_async._lifecycle as lifecycle

    tree = ast.parse(Path(lifecycle.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            name = "." * node.level + (node.module or "")
            imported.update(f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name.startswith((".", "telemetrydeck_async"))}
    assert ours == {"._config.ClientConfig", "._stats.FlushResult"}, ours
