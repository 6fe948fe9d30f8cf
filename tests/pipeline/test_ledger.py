"""The ledger: one object records every signal's fate, and nothing escapes it.

The autouse ``tracked_clients`` fixture (conftest) checks every client of every test; these
tests check the fixture itself and the paths where a signal used to fall between two places.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from telemetrydeck_async import TelemetryClient
from telemetrydeck_async._stats import Accounting
from telemetrydeck_async.devserver import IngestEmulator
from telemetrydeck_async.testing import RecordingClient
from tests.helpers import balanced

BOUND = 30.0


def test_the_books_fixture_sees_every_client_subclasses_included(
    tracked_clients: list[TelemetryClient],
) -> None:
    """Clients built directly and through a subclass are both checked at teardown."""
    plain = TelemetryClient("app", default_user="u")
    recording = RecordingClient()
    assert tracked_clients[-2:] == [plain, recording]
    assert balanced(plain.stats)
    plain._accounting.enqueued += 1  # what the fixture must catch
    assert not balanced(plain.stats)
    plain._accounting.enqueued -= 1


def run_and_return(td: TelemetryClient, count: int) -> None:
    """``asyncio.run()`` in a thread: ``count`` signals, then the coroutine returns unclosed."""

    async def main() -> None:
        for i in range(count):
            td.signal_nowait("Ledger.case", payload={"Test.id": i})

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    thread.join(BOUND)


@pytest.mark.parametrize("spooled", [False, True])
async def test_a_loop_ended_without_aclose_leaves_no_signal_in_no_bucket(
    emulator: IngestEmulator, tmp_path: Path, spooled: bool
) -> None:
    """600 signals, then asyncio.run() returns: the books still hold all 600 (issue 11, part 1).

    The loop's teardown cancels the delivery task the flusher created in its last turn before
    that task ever ran; its batch of 100 must still be pending, then spooled or dropped.
    """
    dropped: list[Any] = []

    def on_drop(signals: Sequence[Mapping[str, Any]], reason: str) -> None:
        dropped.extend(s["payload"]["Test.id"] for s in signals)

    td = TelemetryClient(
        "ledger-app",
        base_url=emulator.base_url,
        default_user="u",
        spool_dir=str(tmp_path) if spooled else None,
        on_drop=on_drop,
    )
    run_and_return(td, 600)
    stats = td.stats
    assert (stats.enqueued, stats.pending) == (600, 600)
    result = await asyncio.wait_for(td.aclose(), BOUND)  # the loop is gone: no network I/O
    if spooled:
        assert (result.spooled, dict(result.dropped)) == (600, {})
    else:
        assert dict(result.dropped) == {"shutdown": 600}
        assert sorted(dropped) == list(range(600))
    assert td.stats.pending == 0
    assert balanced(td.stats)


def test_a_spool_write_that_evicts_its_own_oldest_signals_drops_them_from_the_books() -> None:
    """Records of the very write that did not fit are dropped; older evicted ones are apart."""
    seen: list[tuple[int, str]] = []
    acc = Accounting(on_drop=lambda signals, reason: seen.append((len(signals), reason)))
    bodies = [b'{"n":%d}' % i for i in range(10)]
    # 7 stored, 3 of this write did not fit, 2 older records made room as well.
    acc.record_stored(bodies, stored=7, failed=0, evicted=5)
    assert acc.spooled == 7
    assert acc.dropped == {"spool_full": 3}
    assert acc.spool_dropped == {"spool_full": 2}
    assert seen == [(3, "spool_full")]


def test_a_failed_spool_write_drops_every_signal_as_spool_error_and_tells_on_drop() -> None:
    """A disk error stores nothing: each signal is dropped as spool_error, on_drop sees all."""
    seen: list[tuple[int, str]] = []
    acc = Accounting(on_drop=lambda signals, reason: seen.append((len(signals), reason)))
    acc.record_enqueued(4)
    acc.record_stored([b'{"n":1}'] * 4, stored=0, failed=4, evicted=0)
    assert (acc.spooled, dict(acc.dropped), acc.spool_dropped) == (0, {"spool_error": 4}, {})
    assert seen == [(4, "spool_error")]


async def test_overflow_waiting_for_the_spool_writer_is_saved_when_the_loop_ends(
    emulator: IngestEmulator, tmp_path: Path
) -> None:
    """Signals past max_queue_size wait for the spool writer: a loop ending keeps them too."""
    td = TelemetryClient(
        "ledger-app",
        base_url=emulator.base_url,
        default_user="u",
        spool_dir=str(tmp_path),
        max_queue_size=50,
    )
    run_and_return(td, 600)
    assert td.stats.queue_depth > 50  # the overflow is still in memory, pending
    result = await asyncio.wait_for(td.aclose(), BOUND)
    assert (result.spooled, dict(result.dropped), result.pending) == (600, {}, 0)
    assert balanced(td.stats)
