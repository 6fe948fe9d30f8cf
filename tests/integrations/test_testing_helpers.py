"""telemetrydeck_async.testing: capture an application's signals with no network, assert on them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from unittest.mock import ANY

import pytest

from telemetrydeck_async import InvalidSignalError
from telemetrydeck_async.devserver import IngestEmulator
from telemetrydeck_async.testing import (
    RecordingClient,
    assert_no_signal_sent,
    assert_signal_sent,
)
from tests.helpers import ClientFactory, sdk_parameters, sha256_hex


@pytest.fixture
async def td() -> AsyncIterator[RecordingClient]:
    """A recording client, closed after the test (the fixture the docs recommend)."""
    async with RecordingClient(salt="pepper") as client:
        yield client


async def checkout(td: RecordingClient, user: str, items: int) -> None:
    """Stand-in for application code that is handed a client."""
    await td.signal(
        "Checkout.Payment.completed",
        client_user=user,
        payload={"Cart.items": items, "Cart.coupon": False},
        float_value=19.99,
    )


async def test_recording_client_records_the_exact_wire_signals(td: RecordingClient) -> None:
    """What is recorded is the signal object a server would receive, SDK parameters included."""
    await checkout(td, "alice", 3)
    await td.flush()
    (signal,) = td.signals
    signal = dict(signal)
    signal.pop("receivedAt")
    assert signal == {
        "appID": "test-app",
        "clientUser": sha256_hex("alicepepper"),
        "sessionID": td.session_id,
        "type": "Checkout.Payment.completed",
        "isTestMode": False,
        "floatValue": 19.99,
        "payload": {"Cart.items": 3, "Cart.coupon": False, **sdk_parameters()},
    }


async def test_recording_client_batches_like_the_real_client() -> None:
    """Requests are cut by batch_size exactly as they would be on the network."""
    async with RecordingClient(batch_size=2) as td:
        for i in range(5):
            await td.signal("App.tick", payload={"Test.id": i})
        await td.flush()
        assert [len(request) for request in td.transport.requests] == [2, 2, 1]


async def test_recording_client_validates_like_the_real_client(td: RecordingClient) -> None:
    """A bad call raises InvalidSignalError, as in production."""
    with pytest.raises(InvalidSignalError):
        await td.signal("App.launched", payload={"Cart.items": [1]})


async def test_assert_signal_sent_matches_a_payload_subset(td: RecordingClient) -> None:
    """Only the listed payload keys are compared; the matching signal is returned."""
    await checkout(td, "alice", 3)
    await td.flush()
    signal = td.assert_signal_sent("Checkout.Payment.completed", {"Cart.items": 3})
    assert signal["floatValue"] == 19.99


async def test_assert_signal_sent_takes_identifier_keys_as_keywords() -> None:
    """Payload keys that are identifiers can be passed as keyword arguments."""
    async with RecordingClient() as td:
        await td.signal("Plan.changed", payload={"tier": "pro"})
        await td.flush()
        td.assert_signal_sent("Plan.changed", tier="pro")


async def test_assert_signal_sent_hashes_client_user_with_the_salt(td: RecordingClient) -> None:
    """client_user is the raw id; the helper hashes it with the client's salt to compare."""
    await checkout(td, "alice", 3)
    await td.flush()
    td.assert_signal_sent("Checkout.Payment.completed", client_user="alice")
    with pytest.raises(AssertionError):
        td.assert_signal_sent("Checkout.Payment.completed", client_user="bob")


async def test_assert_signal_sent_accepts_mock_any(td: RecordingClient) -> None:
    """unittest.mock.ANY matches any value, as long as the key is present."""
    async with td.duration("Report.generated"):
        pass
    await td.flush()
    td.assert_signal_sent("Report.generated", {"TelemetryDeck.Signal.durationInSeconds": ANY})


async def test_assert_signal_sent_keeps_booleans_apart_from_numbers(td: RecordingClient) -> None:
    """False does not match 0, as in JSON."""
    await checkout(td, "alice", 3)
    await td.flush()
    with pytest.raises(AssertionError):
        td.assert_signal_sent("Checkout.Payment.completed", {"Cart.coupon": 0})


async def test_assert_signal_sent_float_value_none_means_absent(td: RecordingClient) -> None:
    """float_value=None asserts that the signal has no floatValue."""
    await td.signal("App.launched")
    await td.flush()
    td.assert_signal_sent("App.launched", float_value=None)


async def test_assert_signal_sent_checks_count(td: RecordingClient) -> None:
    """count= requires exactly that many matching signals, and says how many there were."""
    for _ in range(2):
        await td.signal("App.tick")
    await td.flush()
    td.assert_signal_sent("App.tick", count=2)
    with pytest.raises(AssertionError, match="expected 3 signal"):
        td.assert_signal_sent("App.tick", count=3)


async def test_failure_message_explains_each_difference(td: RecordingClient) -> None:
    """The failure lists how each signal of the type differs and which types were sent."""
    await checkout(td, "alice", 2)
    await td.signal("App.launched")
    await td.flush()
    with pytest.raises(AssertionError) as info:
        td.assert_signal_sent(
            "Checkout.Payment.completed", {"Cart.items": 3, "Cart.total": 5}, float_value=1.0
        )
    message = str(info.value)
    assert "no signal matched type 'Checkout.Payment.completed'" in message
    assert "payload['Cart.items'] is 2, expected 3" in message
    assert "payload has no 'Cart.total'" in message
    assert "floatValue is 19.99, expected 1.0" in message
    assert "types sent: App.launched (1), Checkout.Payment.completed (1)" in message


async def test_failure_message_hints_at_flush_when_signals_are_queued(
    td: RecordingClient,
) -> None:
    """Asserting before flush() fails with a hint that signals are still queued."""
    await checkout(td, "alice", 3)
    with pytest.raises(AssertionError, match=r"await client\.flush\(\)"):
        td.assert_signal_sent("Checkout.Payment.completed")


async def test_assert_no_signal_sent(td: RecordingClient) -> None:
    """assert_no_signal_sent passes for absent types and fails naming what was sent."""
    await td.signal("App.launched")
    await td.flush()
    td.assert_no_signal_sent("Checkout.Payment.completed")
    with pytest.raises(AssertionError, match="1 were sent"):
        td.assert_no_signal_sent("App.launched")


async def test_assert_no_signal_sent_refuses_to_pass_with_queued_signals(
    td: RecordingClient,
) -> None:
    """Unflushed signals are not proof of absence: the helper asks for flush() instead."""
    await td.signal("App.launched")
    with pytest.raises(AssertionError, match="still queued"):
        td.assert_no_signal_sent()


async def test_clear_forgets_what_was_recorded(td: RecordingClient) -> None:
    """clear() empties the record, so a test can assert on one phase at a time."""
    await td.signal("App.launched")
    await td.flush()
    td.clear()
    td.assert_no_signal_sent()
    assert json.dumps(td.transport.requests) == "[]"


async def test_module_helper_works_on_emulator_signals(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """assert_signal_sent also accepts a plain list of signal objects, e.g. from the emulator."""
    td = make_client()
    await td.signal("App.launched", payload={"Plan.tier": "pro"})
    await td.flush()
    assert_signal_sent(emulator.signals, "App.launched", {"Plan.tier": "pro"})
    assert_signal_sent(emulator.signals, "App.launched", client_user="test-user")
    assert_no_signal_sent(emulator.signals, "App.crashed")


async def test_recording_client_defaults_need_no_configuration() -> None:
    """RecordingClient() works with no arguments: a test app ID and a test user."""
    async with RecordingClient() as td:
        await td.signal("App.launched")
        await td.flush()
        td.assert_signal_sent("App.launched", client_user="test-user")
        assert td.config.app_id == "test-app"


async def test_assert_signal_sent_compares_floats_with_a_tolerance(td: RecordingClient) -> None:
    """A computed amount (10.0 + 9.99) matches the literal 19.99; a different one does not."""
    await td.signal("Cart.paid", float_value=10.0 + 9.99)
    await td.flush()
    td.assert_signal_sent("Cart.paid", float_value=19.99)
    with pytest.raises(AssertionError):
        td.assert_signal_sent("Cart.paid", float_value=19.98)
