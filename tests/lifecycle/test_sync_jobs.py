"""SyncTelemetryClient in short-lived real processes: exit without close(), fork pools, Lambda.

Each test runs ``tests/scripts/sync_jobs.py`` in a child interpreter against an emulator
served from a thread of this process, and checks what reached it and the child's books.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from telemetrydeck_async import SyncTelemetryClient
from tests import _proc
from tests.helpers import FAST_RETRY, ThreadedEmulator

SCRIPT = str(_proc.SCRIPTS / "sync_jobs.py")
BOUND = 90.0


def run(
    mode: str, base_url: str, spool_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one mode of the script to its end (bounded)."""
    return _proc.run_script(
        "sync_jobs.py", mode, base_url, str(spool_dir) if spool_dir else "-", timeout=BOUND
    )


def books(output: str) -> dict[str, list[tuple[int, int, int, int, int]]]:
    """The ``BOOKS label enqueued sent spooled dropped pending`` lines, by label."""
    found: dict[str, list[tuple[int, int, int, int, int]]] = {}
    pattern = r"^BOOKS (\w+) (\d+) (\d+) (\d+) (\d+) (\d+)$"
    for label, *numbers in re.findall(pattern, output, re.MULTILINE):
        enqueued, sent, spooled, dropped, pending = (int(n) for n in numbers)
        found.setdefault(label, []).append((enqueued, sent, spooled, dropped, pending))
    return found


def balanced(entry: tuple[int, int, int, int, int]) -> bool:
    enqueued, sent, spooled, dropped, pending = entry
    return enqueued == sent + spooled + dropped + pending


def ids(server: ThreadedEmulator, prefix: str) -> list[str]:
    return [
        s["payload"]["Test.id"]
        for s in server.emu.signals
        if s["payload"]["Test.id"].startswith(prefix)
    ]


def deliver_spool(
    server: ThreadedEmulator, spool_dir: Path, count: int, base_url: str | None = None
) -> None:
    """A later run on the same spool sends the ``count`` signals the earlier one left there.

    ``base_url``: the one the earlier run used (spooled signals go to their own destination).
    """
    with SyncTelemetryClient(
        "test-app",
        namespace="com.example",
        base_url=base_url or server.emu.base_url,
        default_user="next-run",
        retry=FAST_RETRY,
        spool_dir=str(spool_dir),
    ) as td:
        td.flush()  # starts the client: it reads the spool in the background
        assert server.wait_for_signals(count, timeout=BOUND)


def test_a_script_that_never_closes_sends_everything_at_exit_to_a_host_name(
    threaded_emulator: ThreadedEmulator,
) -> None:
    """No close(): the exit hook sends all 40 signals, to ``localhost`` (resolved at exit)."""
    url = threaded_emulator.emu.base_url.replace("127.0.0.1", "localhost")
    done = run("unclosed", url)
    assert done.returncode == 0, done.stderr
    assert sorted(ids(threaded_emulator, "cron-")) == sorted(f"cron-{i}" for i in range(40))
    assert books(done.stdout)["exit"] == [(40, 40, 0, 0, 0)]
    assert "can't register atexit" not in done.stderr
    assert "after interpreter shutdown" not in done.stderr


def test_a_script_that_never_closes_spools_everything_while_the_endpoint_is_down(
    threaded_emulator: ThreadedEmulator, tmp_path: Path
) -> None:
    """Endpoint down, no close(): a bounded exit spools all 40; the next run sends them."""
    threaded_emulator.emu.faults.status_always = 503
    url = threaded_emulator.emu.base_url.replace("127.0.0.1", "localhost")
    done = run("unclosed", url, tmp_path)
    assert done.returncode == 0, done.stderr
    assert books(done.stdout)["exit"] == [(40, 0, 40, 0, 0)]
    threaded_emulator.emu.faults.status_always = None
    deliver_spool(threaded_emulator, tmp_path, 40, url)
    assert sorted(ids(threaded_emulator, "cron-")) == sorted(f"cron-{i}" for i in range(40))


def test_a_script_that_never_closes_without_a_spool_exits_and_reports_the_loss(
    threaded_emulator: ThreadedEmulator,
) -> None:
    """Endpoint down, no spool, no close(): the exit still ends (close_timeout) and says so."""
    threaded_emulator.emu.faults.status_always = 503
    done = run("unclosed", threaded_emulator.emu.base_url)
    assert done.returncode == 0, done.stderr
    assert books(done.stdout)["exit"] == [(40, 0, 0, 40, 0)]
    assert "40 signal(s)" in done.stderr


def test_a_fork_pool_of_four_sends_from_every_worker(threaded_emulator: ThreadedEmulator) -> None:
    """A fork pool of 4 (the parent used the client first): every id once, books balance."""
    done = run("pool", threaded_emulator.emu.base_url)
    assert done.returncode == 0, done.stderr
    assert "WORKERS 4" in done.stdout, done.stdout
    expected = sorted(f"pool-{n}-{i}" for n in range(4) for i in range(50))
    assert sorted(ids(threaded_emulator, "pool-")) == expected
    assert ids(threaded_emulator, "parent-") == ["parent-0"]
    found = books(done.stdout)
    assert sorted(found["worker"]) == [(50, 50, 0, 0, 0)] * 4
    assert all(balanced(entry) for entry in found["worker"] + found["parent"]), found


def test_a_lambda_handler_flushes_after_each_of_50_invocations(
    threaded_emulator: ThreadedEmulator,
) -> None:
    """flush_after: nothing is pending after any invocation; all 50 arrive."""
    done = run("lambda", threaded_emulator.emu.base_url)
    assert done.returncode == 0, done.stderr
    assert "PENDING-AFTER" not in done.stdout
    assert books(done.stdout)["lambda"] == [(50, 50, 0, 0, 0)]
    assert sorted(ids(threaded_emulator, "lambda-")) == sorted(f"lambda-{n}" for n in range(50))


def test_durability_always_signals_survive_kill_9(
    threaded_emulator: ThreadedEmulator, tmp_path: Path
) -> None:
    """durability="always": once signal() returned the signal is on disk; SIGKILL loses none."""
    threaded_emulator.emu.faults.status_always = 503  # nothing leaves before the kill
    child = subprocess.Popen(
        [sys.executable, SCRIPT, "always", threaded_emulator.emu.base_url, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=_proc.script_env(),
        cwd=str(_proc.REPO),
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "WRITTEN"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(BOUND)
    threaded_emulator.emu.faults.status_always = None
    deliver_spool(threaded_emulator, tmp_path, 30)
    assert sorted(ids(threaded_emulator, "durable-")) == sorted(f"durable-{i}" for i in range(30))


def test_an_exit_with_calls_in_flight_counts_every_call_that_returned(
    threaded_emulator: ThreadedEmulator,
) -> None:
    """Exit while 4 threads call signal(): each returned call is sent, none left pending."""
    done = run("racing", threaded_emulator.emu.base_url)
    assert done.returncode == 0, done.stderr
    accepted = re.search(r"^ACCEPTED (\d+) ALIVE 0$", done.stdout, re.MULTILINE)
    assert accepted is not None, done.stdout
    [(enqueued, sent, spooled, dropped, pending)] = books(done.stdout)["exit"]
    assert enqueued == int(accepted[1]) >= 2000
    assert pending == 0
    assert enqueued == sent + spooled + dropped
    assert len(ids(threaded_emulator, "race-")) == sent
