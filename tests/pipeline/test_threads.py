"""Submitting signals from threads other than the loop's: signal_threadsafe() and its errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from telemetrydeck_async import (
    ClientClosedError,
    InvalidSignalError,
    TelemetryClient,
    WrongEventLoopError,
)
from telemetrydeck_async.devserver import IngestEmulator
from tests.helpers import ClientFactory

BOUND = 30.0


async def in_thread(fn: Callable[[], object]) -> BaseException | None:
    """Run ``fn`` in a new thread without blocking the loop; return what it raised, if anything."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, thread.join, BOUND)
    assert not thread.is_alive()
    return errors[0] if errors else None


async def test_signal_threadsafe_from_many_threads_delivers_every_signal(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """8 threads x 500 signals at once: every one arrives, none twice."""
    td = make_client()
    await td.start()
    threads, per_thread = 8, 500
    barrier = threading.Barrier(threads)

    def submit(base: int) -> None:
        barrier.wait(BOUND)
        for i in range(per_thread):
            td.signal_threadsafe("Worker.Job.done", payload={"Test.id": base + i})

    workers = [threading.Thread(target=submit, args=(n * per_thread,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    loop = asyncio.get_running_loop()
    for worker in workers:
        await loop.run_in_executor(None, worker.join, BOUND)
    await asyncio.wait_for(td.flush(), BOUND)
    assert td.stats.sent == threads * per_thread
    assert emulator.distinct_ids() == set(range(threads * per_thread))
    assert emulator.duplicates() == 0


async def test_signal_threadsafe_raises_invalid_input_in_the_calling_thread(
    make_client: ClientFactory,
) -> None:
    """A bad signal raises InvalidSignalError in the thread that sent it; nothing is queued."""
    td = make_client()
    await td.start()
    error = await in_thread(lambda: td.signal_threadsafe("App.tick", float_value=float("nan")))
    assert isinstance(error, InvalidSignalError)
    await asyncio.sleep(0)
    assert td.stats.enqueued == 0


async def test_signal_threadsafe_before_start_raises_wrong_event_loop(
    make_client: ClientFactory,
) -> None:
    """A client not yet started on a loop cannot take signals from threads."""
    td = make_client()
    error = await in_thread(lambda: td.signal_threadsafe("App.tick"))
    assert isinstance(error, WrongEventLoopError)
    assert "start" in str(error)


async def test_signal_threadsafe_after_aclose_raises_client_closed(
    make_client: ClientFactory,
) -> None:
    """A closed client refuses signals from threads with ClientClosedError."""
    td = make_client()
    await td.start()
    await td.aclose()
    error = await in_thread(lambda: td.signal_threadsafe("App.tick"))
    assert isinstance(error, ClientClosedError)


async def test_signal_threadsafe_after_the_loop_ended_raises_client_closed(
    emulator: IngestEmulator,
) -> None:
    """When the client's loop is gone, a signal from a thread is refused, not silently lost."""
    td = TelemetryClient("test-app", base_url=emulator.base_url, default_user="u")
    thread = threading.Thread(target=asyncio.run, args=(td.start(),))
    thread.start()
    thread.join(BOUND)
    with pytest.raises(ClientClosedError):
        td.signal_threadsafe("App.tick")
    await td.aclose()


async def test_a_signal_handed_over_after_aclose_began_is_counted_as_dropped(
    make_client: ClientFactory,
) -> None:
    """The loop-side hand-over drops a signal arriving after aclose() began, reason shutdown.

    A thread can pass signal_threadsafe()'s closed check just before aclose() starts; its
    signal then reaches the loop too late. That race cannot be timed from a test, so the
    loop-side step is called directly.
    """
    td = make_client()
    await td.start()
    late = td._build("App.tick", None, None, None, None, None)
    await td.aclose()
    td._flusher.handed_over.append(late)
    td._take_handed_over()
    stats = td.stats
    assert (stats.enqueued, dict(stats.dropped), stats.pending) == (1, {"shutdown": 1}, 0)


async def test_signal_threadsafe_on_the_loop_thread_queues_at_once(
    make_client: ClientFactory,
) -> None:
    """Called on the loop's own thread, signal_threadsafe() queues before it returns."""
    td = make_client()
    await td.start()
    td.signal_threadsafe("App.tick")
    assert td.stats.queue_depth == 1


async def test_signal_nowait_from_a_foreign_thread_points_to_signal_threadsafe(
    make_client: ClientFactory,
) -> None:
    """signal_nowait() off the loop thread raises WrongEventLoopError naming the right method."""
    td = make_client()
    await td.start()
    error = await in_thread(lambda: td.signal_nowait("App.tick"))
    assert isinstance(error, WrongEventLoopError)
    assert "signal_threadsafe()" in str(error)
