"""Presets: each sends the exact TelemetryDeck signal, validates its arguments, and never leaks."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from telemetrydeck_async import (
    InvalidSignalError,
    TelemetryClient,
    WrongEventLoopError,
)
from telemetrydeck_async.devserver import IngestEmulator
from telemetrydeck_async.testing import RecordingClient
from tests.helpers import ClientFactory, sdk_parameters, sha256_hex

SESSION = "session-1"
DURATION = re.compile(r"^\d+\.\d{3}$")


class PaymentDeclinedError(Exception):
    """An application's own exception, for the qualified-name error id."""


async def only_signal(td: TelemetryClient, emulator: IngestEmulator) -> dict[str, Any]:
    """Flush and return the one signal the emulator received, without its receivedAt."""
    await td.flush()
    (signal,) = emulator.signals
    signal.pop("receivedAt")
    return signal


def wire(
    signal_type: str, params: dict[str, Any], float_value: float | None = None
) -> dict[str, Any]:
    """The signal object a preset must produce for the make_client defaults."""
    obj: dict[str, Any] = {
        "appID": "test-app",
        "clientUser": sha256_hex("test-user"),
        "sessionID": SESSION,
        "type": signal_type,
        "isTestMode": False,
        "payload": {**sdk_parameters(), **params},
    }
    if float_value is not None:
        obj["floatValue"] = float_value
    return obj


PresetCall = Callable[[TelemetryClient], Awaitable[Any]]

EXACT: list[tuple[str, PresetCall, dict[str, Any]]] = [
    (
        "navigation",
        lambda td: td.navigation("/cart", "/checkout"),
        wire(
            "TelemetryDeck.Navigation.pathChanged",
            {
                "TelemetryDeck.Navigation.schemaVersion": "1",
                "TelemetryDeck.Navigation.identifier": "/cart -> /checkout",
                "TelemetryDeck.Navigation.sourcePath": "/cart",
                "TelemetryDeck.Navigation.destinationPath": "/checkout",
            },
        ),
    ),
    (
        "error with an id",
        lambda td: td.error("Checkout.cardExpired", message="card expired", category="user-input"),
        wire(
            "TelemetryDeck.Error.occurred",
            {
                "TelemetryDeck.Error.id": "Checkout.cardExpired",
                "TelemetryDeck.Error.message": "card expired",
                "TelemetryDeck.Error.category": "user-input",
            },
        ),
    ),
    (
        "error with an exception",
        lambda td: td.error(PaymentDeclinedError("insufficient funds")),
        wire(
            "TelemetryDeck.Error.occurred",
            {
                "TelemetryDeck.Error.id": "tests.pipeline.test_presets.PaymentDeclinedError",
                "TelemetryDeck.Error.message": "insufficient funds",
                "TelemetryDeck.Error.category": "thrown-exception",
            },
        ),
    ),
    (
        "purchase completed",
        lambda td: td.purchase_completed(
            9.99,
            purchase_type="subscription",
            product_id="pro.monthly",
            country_code="DE",
            currency_code="EUR",
        ),
        wire(
            "TelemetryDeck.Purchase.completed",
            {
                "TelemetryDeck.Purchase.type": "subscription",
                "TelemetryDeck.Purchase.countryCode": "DE",
                "TelemetryDeck.Purchase.currencyCode": "EUR",
                "TelemetryDeck.Purchase.productID": "pro.monthly",
            },
            float_value=9.99,
        ),
    ),
    (
        "free trial started",
        lambda td: td.free_trial_started(product_id="pro.monthly"),
        wire(
            "TelemetryDeck.Purchase.freeTrialStarted",
            {
                "TelemetryDeck.Purchase.type": "subscription",
                "TelemetryDeck.Purchase.productID": "pro.monthly",
            },
        ),
    ),
    (
        "converted from trial",
        lambda td: td.converted_from_trial(amount_usd=4.5, product_id="pro.monthly"),
        wire(
            "TelemetryDeck.Purchase.convertedFromTrial",
            {
                "TelemetryDeck.Purchase.type": "subscription",
                "TelemetryDeck.Purchase.productID": "pro.monthly",
            },
            float_value=4.5,
        ),
    ),
    (
        "new install detected",
        lambda td: td.new_install_detected(),
        wire("TelemetryDeck.Acquisition.newInstallDetected", {}),
    ),
    (
        "user acquired",
        lambda td: td.user_acquired("newsletter"),
        wire(
            "TelemetryDeck.Acquisition.userAcquired",
            {"TelemetryDeck.Acquisition.channel": "newsletter"},
        ),
    ),
    (
        "lead started",
        lambda td: td.lead_started("lead-7"),
        wire(
            "TelemetryDeck.Acquisition.leadStarted", {"TelemetryDeck.Acquisition.leadID": "lead-7"}
        ),
    ),
    (
        "lead converted",
        lambda td: td.lead_converted("lead-7"),
        wire(
            "TelemetryDeck.Acquisition.leadConverted",
            {"TelemetryDeck.Acquisition.leadID": "lead-7"},
        ),
    ),
    (
        "onboarding completed",
        lambda td: td.onboarding_completed(),
        wire("TelemetryDeck.Activation.onboardingCompleted", {}),
    ),
    (
        "core feature used",
        lambda td: td.core_feature_used("Export.pdf"),
        wire(
            "TelemetryDeck.Activation.coreFeatureUsed",
            {"TelemetryDeck.Activation.featureName": "Export.pdf"},
        ),
    ),
]


@pytest.mark.parametrize(("call", "expected"), [pytest.param(c, e, id=n) for n, c, e in EXACT])
async def test_preset_sends_the_exact_signal(
    make_client: ClientFactory,
    emulator: IngestEmulator,
    call: PresetCall,
    expected: dict[str, Any],
) -> None:
    """Each preset arrives at the server as exactly the documented signal object."""
    td = make_client(session_id=SESSION)
    await call(td)
    assert await only_signal(td, emulator) == expected


async def test_new_session_sends_session_started_with_the_new_id(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """new_session() sends TelemetryDeck.Session.started carrying the new session id."""
    td = make_client(session_id=SESSION)
    new_id = await td.new_session("session-2")
    expected = wire("TelemetryDeck.Session.started", {})
    expected["sessionID"] = "session-2"
    assert new_id == "session-2"
    assert await only_signal(td, emulator) == expected


async def test_duration_context_manager_sends_duration_in_seconds(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """async with td.duration() sends the type with durationInSeconds as a 3-decimal string."""
    td = make_client(session_id=SESSION)
    async with td.duration("Report.generated", payload={"Report.kind": "pdf"}):
        await asyncio.sleep(0)
    signal = await only_signal(td, emulator)
    seconds = signal["payload"].pop("TelemetryDeck.Signal.durationInSeconds")
    assert DURATION.match(seconds)
    assert signal == wire("Report.generated", {"Report.kind": "pdf"})


async def test_duration_still_sends_with_an_error_marker_when_the_block_raises(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A raising block is timed, marked with the exception's id and category, and re-raised."""
    td = make_client(session_id=SESSION)
    with pytest.raises(PaymentDeclinedError):
        async with td.duration("Report.generated"):
            raise PaymentDeclinedError("no")
    signal = await only_signal(td, emulator)
    assert DURATION.match(signal["payload"].pop("TelemetryDeck.Signal.durationInSeconds"))
    assert signal == wire(
        "Report.generated",
        {
            "TelemetryDeck.Error.id": "tests.pipeline.test_presets.PaymentDeclinedError",
            "TelemetryDeck.Error.category": "thrown-exception",
        },
    )


async def test_duration_decorates_an_async_function(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A decorated coroutine function returns its value and sends one signal per call."""
    td = make_client()

    @td.duration("Import.finished")
    async def run_import(rows: int) -> int:
        await asyncio.sleep(0)
        return rows * 2

    assert await run_import(2) == 4
    assert await run_import(3) == 6
    await td.flush()
    assert [s["type"] for s in emulator.signals] == ["Import.finished", "Import.finished"]
    assert all(
        DURATION.match(s["payload"]["TelemetryDeck.Signal.durationInSeconds"])
        for s in emulator.signals
    )


async def test_duration_decorates_a_sync_function(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A decorated plain function, called on the loop thread, is timed and keeps its result."""
    td = make_client()

    @td.duration("Parse.finished")
    def parse(text: str) -> list[str]:
        return text.split()

    assert parse("a b c") == ["a", "b", "c"]
    assert parse.__name__ == "parse"
    await td.flush()
    (signal,) = emulator.signals
    assert signal["type"] == "Parse.finished"
    assert DURATION.match(signal["payload"]["TelemetryDeck.Signal.durationInSeconds"])


async def test_duration_decorated_sync_function_that_raises_is_marked(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A decorated plain function that raises sends the error marker and re-raises."""
    td = make_client()

    @td.duration("Parse.finished")
    def parse(text: str) -> int:
        return int(text)

    with pytest.raises(ValueError, match="invalid literal"):
        parse("not a number")
    await td.flush()
    (signal,) = emulator.signals
    assert signal["payload"]["TelemetryDeck.Error.id"] == "ValueError"
    assert signal["payload"]["TelemetryDeck.Error.category"] == "thrown-exception"


async def test_duration_concurrent_decorated_calls_are_timed_independently() -> None:
    """Concurrent calls of one decorated coroutine each send their own signal."""
    async with RecordingClient() as td:

        @td.duration("Job.done")
        async def job() -> None:
            await asyncio.sleep(0)

        await asyncio.gather(job(), job(), job())
        await td.flush()
        td.assert_signal_sent("Job.done", count=3)


async def test_duration_timer_cannot_be_entered_twice_at_once() -> None:
    """Re-entering a running timer is a programming error, reported clearly."""
    async with RecordingClient() as td:
        timer = td.duration("Job.done")
        async with timer:
            with pytest.raises(RuntimeError, match="already running"):
                async with timer:
                    pass


async def test_duration_validates_its_arguments_before_the_block_runs() -> None:
    """A reserved type or a nested payload is refused when the timer is created."""
    async with RecordingClient() as td:
        with pytest.raises(InvalidSignalError) as info:
            td.duration("TelemetryDeck.Signal.custom")
        assert info.value.field == "type"
        with pytest.raises(InvalidSignalError) as info:
            td.duration("Report.generated", payload={"Report.rows": [1, 2]})
        assert info.value.field == "payload['Report.rows']"
        with pytest.raises(InvalidSignalError) as info:
            td.duration("Report.generated", client_user="")
        assert info.value.field == "client_user"


async def test_sync_duration_off_the_loop_thread_fails_before_the_block(
    make_client: ClientFactory,
) -> None:
    """Sync use from another thread raises WrongEventLoopError and the block never runs."""
    td = make_client()
    await td.start()
    ran: list[bool] = []
    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            with td.duration("Job.done"):
                ran.append(True)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert ran == []
    assert len(errors) == 1
    assert isinstance(errors[0], WrongEventLoopError)


async def test_error_with_a_builtin_exception_uses_its_plain_name() -> None:
    """Built-in exceptions are identified as ValueError, not builtins.ValueError."""
    async with RecordingClient() as td:
        await td.error(ValueError("bad"))
        await td.flush()
        td.assert_signal_sent(
            "TelemetryDeck.Error.occurred",
            {"TelemetryDeck.Error.id": "ValueError", "TelemetryDeck.Error.message": "bad"},
        )


async def test_error_never_sends_traceback_locals() -> None:
    """Local variables of the raising frame never reach the wire, only type and message."""

    def charge() -> None:
        card_number = "4111-1111-1111-1111"  # a local the traceback holds
        raise PaymentDeclinedError(f"declined ({len(card_number)} digits)")

    async with RecordingClient() as td:
        try:
            charge()
        except PaymentDeclinedError as exc:
            await td.error(exc)
        await td.flush()
        assert "4111" not in repr(td.transport.requests)
        assert "charge" not in repr(td.transport.requests)


async def test_error_message_empty_string_sends_no_message() -> None:
    """message="" leaves the exception's text out (it may contain user input)."""
    async with RecordingClient() as td:
        await td.error(KeyError("alice@example.com"), message="")
        await td.flush()
        (signal,) = td.signals
        assert "TelemetryDeck.Error.message" not in signal["payload"]
        assert "alice" not in repr(signal)


async def test_error_message_from_a_long_exception_is_cut() -> None:
    """An exception's text is cut to 500 characters so the report is never refused."""
    async with RecordingClient() as td:
        await td.error(RuntimeError("x" * 10_000))
        await td.flush()
        (signal,) = td.signals
        assert len(signal["payload"]["TelemetryDeck.Error.message"]) == 500


BAD_PRESET_CALLS: list[tuple[str, PresetCall, str]] = [
    ("error category", lambda td: td.error("E.x", category="oops"), "category"),  # type: ignore[arg-type]  # the wrong value is the test
    ("error empty id", lambda td: td.error(""), "error"),
    ("error id not str", lambda td: td.error(42), "error"),  # type: ignore[arg-type]  # the wrong type is the test
    ("error message not str", lambda td: td.error("E.x", message=3), "message"),  # type: ignore[arg-type]  # the wrong type is the test
    ("navigation empty destination", lambda td: td.navigation("/a", ""), "destination"),
    ("navigation source not str", lambda td: td.navigation(None, "/b"), "source"),  # type: ignore[arg-type]  # the wrong type is the test
    (
        "purchase type",
        lambda td: td.purchase_completed(1.0, purchase_type="gift"),  # type: ignore[arg-type]  # the wrong value is the test
        "purchase_type",
    ),
    (
        "purchase amount NaN",
        lambda td: td.purchase_completed(float("nan"), purchase_type="subscription"),
        "amount_usd",
    ),
    (
        "purchase amount negative",
        lambda td: td.purchase_completed(-1, purchase_type="subscription"),
        "amount_usd",
    ),
    (
        "purchase product id empty",
        lambda td: td.free_trial_started(product_id=""),
        "product_id",
    ),
    ("user acquired empty channel", lambda td: td.user_acquired(" "), "channel"),
    ("lead started empty id", lambda td: td.lead_started(""), "lead_id"),
    ("lead converted id not str", lambda td: td.lead_converted(7), "lead_id"),  # type: ignore[arg-type]  # the wrong type is the test
    ("core feature empty name", lambda td: td.core_feature_used(""), "name"),
    (
        "preset payload overriding a preset key",
        lambda td: td.navigation(
            "/a", "/b", payload={"TelemetryDeck.Navigation.identifier": "forged"}
        ),
        "payload['TelemetryDeck.Navigation.identifier']",
    ),
    (
        "preset payload nested",
        lambda td: td.onboarding_completed(payload={"Onboarding.steps": [1, 2]}),
        "payload['Onboarding.steps']",
    ),
    ("preset client_user empty", lambda td: td.onboarding_completed(client_user=""), "client_user"),
    ("new session empty id", lambda td: td.new_session(""), "session_id"),
]


@pytest.mark.parametrize(
    ("call", "field"), [pytest.param(c, f, id=n) for n, c, f in BAD_PRESET_CALLS]
)
async def test_preset_refuses_a_bad_argument_and_queues_nothing(
    call: PresetCall, field: str
) -> None:
    """A bad preset argument raises InvalidSignalError naming it, and nothing is queued."""
    async with RecordingClient() as td:
        with pytest.raises(InvalidSignalError) as info:
            await call(td)
        assert info.value.field == field
        assert td.stats.enqueued == 0


async def test_preset_payload_is_merged_under_the_preset_keys(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """A preset's own payload argument is sent beside the TelemetryDeck keys."""
    td = make_client(session_id=SESSION)
    await td.core_feature_used("Export.pdf", payload={"Export.pages": 3})
    assert await only_signal(td, emulator) == wire(
        "TelemetryDeck.Activation.coreFeatureUsed",
        {"Export.pages": 3, "TelemetryDeck.Activation.featureName": "Export.pdf"},
    )
