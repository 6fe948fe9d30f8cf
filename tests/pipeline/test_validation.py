"""Bad input gets a clear error, costs nothing, and leaves the client working."""

from __future__ import annotations

import datetime as dt
import enum
import math
from pathlib import Path
from typing import Any

import pytest

from telemetrydeck_async import (
    ConfigurationError,
    InvalidSignalError,
    RetryPolicy,
    TelemetryClient,
    TelemetryDeckError,
)
from telemetrydeck_async.devserver import IngestEmulator
from tests.helpers import ClientFactory, sdk_parameters, sha256_hex

#: Part of the fast core CI also runs on the installed wheel (oldest and newest Python).
pytestmark = pytest.mark.core

BAD_SIGNALS: list[tuple[str, dict[str, Any], str]] = [
    ("empty type", {"signal_type": ""}, "type"),
    ("blank type", {"signal_type": "   "}, "type"),
    ("non-string type", {"signal_type": 42}, "type"),
    ("reserved type", {"signal_type": "TelemetryDeck.Session.started"}, "type"),
    ("payload not a mapping", {"payload": [("a", 1)]}, "payload"),
    ("payload key not str", {"payload": {1: "x"}}, "payload"),
    ("payload key empty", {"payload": {"": "x"}}, "payload"),
    ("nested dict", {"payload": {"Cart.items": {"a": 1}}}, "payload['Cart.items']"),
    ("nested list", {"payload": {"Cart.items": [1, 2]}}, "payload['Cart.items']"),
    ("nested set", {"payload": {"Cart.items": {1}}}, "payload['Cart.items']"),
    ("bytes value", {"payload": {"Cart.blob": b"\x00"}}, "payload['Cart.blob']"),
    ("object value", {"payload": {"Cart.obj": object()}}, "payload['Cart.obj']"),
    ("NaN value", {"payload": {"Cart.total": math.nan}}, "payload['Cart.total']"),
    ("SDK key", {"payload": {"TelemetryDeck.SDK.name": "x"}}, "payload['TelemetryDeck.SDK.name']"),
    ("reserved key appID", {"payload": {"appID": "x"}}, "payload['appID']"),
    ("reserved key floatValue", {"payload": {"floatValue": 1}}, "payload['floatValue']"),
    ("reserved key __time", {"payload": {"__time": 1}}, "payload['__time']"),
    ("float_value NaN", {"float_value": math.nan}, "float_value"),
    ("float_value inf", {"float_value": math.inf}, "float_value"),
    ("float_value str", {"float_value": "1.5"}, "float_value"),
    ("float_value bool", {"float_value": True}, "float_value"),
    ("client_user empty", {"client_user": ""}, "client_user"),
    ("client_user not str", {"client_user": 42}, "client_user"),
    ("session_id empty", {"session_id": ""}, "session_id"),
    ("test_mode not bool", {"test_mode": "yes"}, "test_mode"),
    ("oversize signal", {"payload": {"Blob.text": "x" * 5000}}, "payload"),
]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [pytest.param(k, f, id=name) for name, k, f in BAD_SIGNALS],
)
async def test_bad_signal_raises_naming_field_and_enqueues_nothing(
    make_client: ClientFactory,
    emulator: IngestEmulator,
    kwargs: dict[str, Any],
    field: str,
) -> None:
    """Each bad argument raises InvalidSignalError naming the field; the client stays usable."""
    td = make_client(max_batch_bytes=4096)
    await td.start()
    call: dict[str, Any] = {"signal_type": "App.launched", **kwargs}
    signal_type = call.pop("signal_type")
    with pytest.raises(InvalidSignalError) as info:
        await td.signal(signal_type, **call)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TelemetryDeckError)
    assert field in str(info.value)
    with pytest.raises(InvalidSignalError):
        td.signal_nowait(signal_type, **call)
    assert td.stats.enqueued == 0
    assert td.stats.queue_depth == 0
    await td.signal("App.stillWorks")
    result = await td.flush()
    assert result.sent == 1
    assert [s["type"] for s in emulator.signals] == ["App.stillWorks"]


async def test_no_user_and_no_default_user_uses_the_persisted_random_id(
    make_client: ClientFactory, emulator: IngestEmulator, tmp_path: Path
) -> None:
    """Without client_user or default_user, the installation's persisted random id is used."""
    user_file = tmp_path / "default-user.id"
    td = make_client(default_user=None, default_user_file=user_file)
    await td.signal("App.launched")
    await td.flush()
    stored = user_file.read_text().strip()
    assert [s["clientUser"] for s in emulator.signals if s["type"] == "App.launched"] == [
        sha256_hex(stored)
    ]


class Plan(enum.Enum):
    """An enum whose values are sent as their plain value."""

    PRO = "pro"


async def test_payload_values_are_normalised(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """None values are skipped, datetimes become ISO-8601, enums their value, primitives pass."""
    td = make_client()
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)
    await td.signal(
        "App.launched",
        payload={
            "A.none": None,
            "A.when": when,
            "A.day": dt.date(2026, 1, 2),
            "A.plan": Plan.PRO,
            "A.flag": False,
            "A.count": 3,
            "A.ratio": 0.5,
            "A.text": "héllo ✓",
        },
    )
    await td.flush()
    assert emulator.signals[0]["payload"] == {
        "A.when": "2026-01-02T03:04:05.678Z",
        "A.day": "2026-01-02",
        "A.plan": "pro",
        "A.flag": False,
        "A.count": 3,
        "A.ratio": 0.5,
        "A.text": "héllo ✓",
        **sdk_parameters(),
    }


BAD_OPTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("empty app id", {"app_id": ""}, "app_id"),
    ("namespace with slash", {"namespace": "com/example"}, "namespace"),
    ("namespace with space", {"namespace": "com example"}, "namespace"),
    ("zero batch size", {"batch_size": 0}, "batch_size"),
    ("negative interval", {"flush_interval": -1.0}, "flush_interval"),
    ("NaN interval", {"flush_interval": math.nan}, "flush_interval"),
    ("zero queue", {"max_queue_size": 0}, "max_queue_size"),
    ("tiny max bytes", {"max_batch_bytes": 10}, "max_batch_bytes"),
    ("zero timeout", {"request_timeout": 0}, "request_timeout"),
    ("plain http remote", {"base_url": "http://example.com"}, "base_url"),
    ("ftp url", {"base_url": "ftp://127.0.0.1"}, "base_url"),
    ("bad default payload", {"default_payload": {"a": [1]}}, "default_payload"),
    ("bad durability", {"durability": "sometimes"}, "durability"),
]


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [pytest.param(k, o, id=name) for name, k, o in BAD_OPTIONS],
)
def test_bad_option_raises_at_construction(kwargs: dict[str, Any], option: str) -> None:
    """A wrong option fails in the constructor with a ValueError naming it."""
    options = {"app_id": "app", **kwargs}
    app_id = options.pop("app_id")
    with pytest.raises(ConfigurationError) as info:
        TelemetryClient(app_id, **options)
    assert info.value.option == option
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "field", ["initial_backoff", "max_backoff", "deadline", "auth_probe_interval"]
)
@pytest.mark.parametrize("value", [0, -1.5, math.nan])
def test_bad_retry_policy_raises_configuration_error_naming_the_field(
    field: str, value: float
) -> None:
    """RetryPolicy refuses a value that is not > 0 like any option: named, still a ValueError."""
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(**{field: value})
    assert info.value.option == f"RetryPolicy.{field}"
    assert info.value.reason == f"must be > 0, got {value!r}"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8787", "http://localhost:1", "http://[::1]:8787", "https://example.com"],
)
def test_loopback_http_and_any_https_base_urls_are_accepted(url: str) -> None:
    """http:// works for loopback (the emulator); https:// for anything."""
    td = TelemetryClient("app", base_url=url)
    assert td.config.base_url == url.rstrip("/")
