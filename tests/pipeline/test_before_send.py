"""``before_send``: what the hook sees, what it may change, and how its drops are counted."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from telemetrydeck_async import ConfigurationError, InvalidSignalError, TelemetryClient
from telemetrydeck_async.devserver import IngestEmulator
from tests.helpers import ClientFactory, balanced, sdk_parameters


async def test_the_hook_sees_the_wire_names_and_only_the_callers_keys(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """type (prefixed), payload (defaults + call), floatValue, sessionID, isTestMode."""
    seen: list[dict[str, Any]] = []

    def hook(signal: dict[str, Any]) -> dict[str, Any]:
        seen.append({**signal, "payload": dict(signal["payload"])})
        return signal

    td = make_client(
        before_send=hook,
        default_payload={"App.region": "eu"},
        signal_prefix="My.",
        payload_prefix="P.",
        test_mode=True,
        session_id="s-1",
    )
    async with td:
        await td.signal("Checkout.done", payload={"Cart.items": 3}, float_value=9.5)
        await td.onboarding_completed()
        await td.flush(timeout=20)
    assert seen == [
        {
            "type": "My.Checkout.done",
            "payload": {"P.App.region": "eu", "P.Cart.items": 3},
            "floatValue": 9.5,
            "sessionID": "s-1",
            "isTestMode": True,
        },
        {
            "type": "TelemetryDeck.Activation.onboardingCompleted",
            "payload": {"P.App.region": "eu"},
            "floatValue": None,
            "sessionID": "s-1",
            "isTestMode": True,
        },
    ]
    # Unchanged by the hook, both arrive with the SDK's keys added after it.
    assert [s["payload"]["TelemetryDeck.SDK.name"] for s in emulator.signals] == [
        sdk_parameters()["TelemetryDeck.SDK.name"]
    ] * 2


async def test_changes_to_type_payload_and_float_value_are_sent(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A new dict, or the same one changed in place: both count; SDK keys still follow."""

    def rename(signal: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "Renamed.kind",
            "payload": {"Kept.key": "yes"},
            "floatValue": 1.25,
            "sessionID": signal["sessionID"],
            "isTestMode": signal["isTestMode"],
        }

    def scrub(signal: dict[str, Any]) -> dict[str, Any]:
        del signal["payload"]["User.email"]
        signal["payload"]["Scrubbed"] = True
        signal["floatValue"] = None
        return signal

    async with make_client(before_send=rename, default_payload={"App.region": "eu"}) as td:
        await td.signal("Original.kind", payload={"Secret": "x"}, float_value=3.0)
        await td.flush(timeout=20)
    async with make_client(before_send=scrub) as td:
        await td.signal("Form.sent", payload={"User.email": "a@b.c", "Form.id": 7}, float_value=2)
        await td.flush(timeout=20)
    renamed, scrubbed = emulator.signals
    assert renamed["type"] == "Renamed.kind"
    assert renamed["floatValue"] == 1.25
    assert renamed["payload"] == {**sdk_parameters(), "Kept.key": "yes"}  # default key removed
    assert scrubbed["type"] == "Form.sent"
    assert "floatValue" not in scrubbed
    assert scrubbed["payload"] == {**sdk_parameters(), "Form.id": 7, "Scrubbed": True}


async def test_returning_none_drops_and_counts_it_without_a_warning(
    make_client: ClientFactory, emulator: IngestEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Dropped as "before_send", passed to on_drop, the books balance, no WARNING."""
    dropped: list[tuple[Sequence[Mapping[str, Any]], str]] = []

    def only_even(signal: dict[str, Any]) -> dict[str, Any] | None:
        return signal if signal["payload"]["Test.id"] % 2 == 0 else None

    caplog.set_level(logging.DEBUG, logger="telemetrydeck_async")
    td = make_client(before_send=only_even, on_drop=lambda s, r: dropped.append((s, r)))
    async with td:
        for i in range(10):
            await td.signal("Filter.case", payload={"Test.id": i})
        td.signal_nowait("Filter.case", payload={"Test.id": 11})
        assert balanced(td.stats)
        await td.flush(timeout=20)
        stats = td.stats
    assert stats.dropped == {"before_send": 6}
    assert stats.enqueued == 11
    assert stats.sent == 5
    assert emulator.distinct_ids() == {0, 2, 4, 6, 8}
    assert [r for _, r in dropped] == ["before_send"] * 6
    assert dropped[0][0][0]["payload"] == {"Test.id": 1}
    assert dropped[0][0][0]["clientUser"]  # the hash, never the raw id
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("returned", "field"),
    [
        ({"type": "", "payload": {}}, "type (returned by before_send)"),
        ({"type": "TelemetryDeck.Fake", "payload": {}}, "type (returned by before_send)"),
        (
            {"type": "T.t", "payload": {"TelemetryDeck.SDK.name": "x"}},
            "payload['TelemetryDeck.SDK.name'] (returned by before_send)",
        ),
        (
            {"type": "T.t", "payload": {"a": {"nested": 1}}},
            "payload['a'] (returned by before_send)",
        ),
        ({"type": "T.t", "payload": {}, "floatValue": float("nan")}, "floatValue"),
        ("not a dict", "before_send"),
    ],
)
async def test_what_the_hook_returns_is_checked_like_a_call(
    make_client: ClientFactory, returned: object, field: str
) -> None:
    """A bad result raises InvalidSignalError from the call, naming the field; nothing queued."""
    td = make_client(before_send=lambda _signal: returned)
    async with td:
        with pytest.raises(InvalidSignalError) as caught:
            await td.signal("Checked.case")
        assert caught.value.field.startswith(field)
        assert td.stats.enqueued == 0


async def test_a_raising_hook_keeps_the_signal_and_warns_once(
    make_client: ClientFactory, emulator: IngestEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Twenty failures: twenty signals sent as they were, one WARNING with the traceback."""

    def broken(signal: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("oops")

    caplog.set_level(logging.WARNING, logger="telemetrydeck_async")
    async with make_client(before_send=broken) as td:
        for i in range(20):
            await td.signal("Broken.case", payload={"Test.id": i})
        await td.flush(timeout=20)
    assert emulator.distinct_ids() == set(range(20))
    warnings = [r for r in caplog.records if "before_send" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].exc_info is not None


async def test_the_hook_runs_in_the_callers_thread(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """signal_threadsafe(): the hook runs in the worker thread; its drops balance the books."""
    threads: set[int] = set()

    def hook(signal: dict[str, Any]) -> dict[str, Any] | None:
        threads.add(threading.get_ident())
        return None if signal["type"] == "Drop.me" else signal

    td = make_client(before_send=hook)
    async with td:

        def worker() -> None:
            for _ in range(5):
                td.signal_threadsafe("Keep.me")
                td.signal_threadsafe("Drop.me")

        thread = threading.Thread(target=worker)
        thread.start()
        await asyncio.to_thread(thread.join)
        await td.flush(timeout=20)
        stats = td.stats
        assert balanced(td.stats)
    assert threads == {thread.ident}
    assert stats.dropped == {"before_send": 5}
    assert stats.sent == 5


def test_a_disabled_client_never_calls_the_hook() -> None:
    """enabled=False: arguments checked, the hook not called."""
    calls: list[object] = []
    td = TelemetryClient("app", enabled=False, before_send=calls.append)
    td.signal_nowait("Some.type")
    assert calls == []


def test_before_send_must_be_callable() -> None:
    """A non-callable is refused at construction, naming the option."""
    with pytest.raises(ConfigurationError, match="before_send"):
        TelemetryClient("app", before_send="scrub")  # type: ignore[arg-type]


async def test_a_preset_keeps_its_reserved_type_when_the_hook_changes_its_payload(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """The hook may add a key to a preset; the TelemetryDeck type and keys stay."""

    def tag(signal: dict[str, Any]) -> dict[str, Any]:
        signal["payload"]["Tagged"] = "yes"
        return signal

    async with make_client(before_send=tag) as td:
        await td.core_feature_used("Export")
        await td.flush(timeout=20)
    (sent,) = emulator.signals
    assert sent["type"] == "TelemetryDeck.Activation.coreFeatureUsed"
    assert sent["payload"]["Tagged"] == "yes"
    assert sent["payload"]["TelemetryDeck.Activation.featureName"] == "Export"


async def test_renaming_only_the_type_keeps_the_payload(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A hook that changes only the type: the payload goes out as the call gave it."""

    def rename(signal: dict[str, Any]) -> dict[str, Any]:
        return {**signal, "type": "New.name"}

    async with make_client(before_send=rename, default_payload={"App.region": "eu"}) as td:
        await td.signal("Old.name", payload={"Cart.items": 2})
        await td.flush(timeout=20)
    (sent,) = emulator.signals
    assert sent["type"] == "New.name"
    assert sent["payload"] == {**sdk_parameters(), "App.region": "eu", "Cart.items": 2}


async def test_a_call_overriding_a_default_key_is_shown_without_sdk_keys(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """The merged case: the hook sees the call's value for the default key, no SDK keys."""
    seen: list[dict[str, Any]] = []

    def look(signal: dict[str, Any]) -> dict[str, Any]:
        seen.append(dict(signal["payload"]))
        return signal

    async with make_client(before_send=look, default_payload={"App.region": "eu"}) as td:
        await td.signal("Region.set", payload={"App.region": "us", "Other": 1})
        await td.flush(timeout=20)
    assert seen == [{"App.region": "us", "Other": 1}]
    (sent,) = emulator.signals
    assert sent["payload"] == {**sdk_parameters(), "App.region": "us", "Other": 1}
