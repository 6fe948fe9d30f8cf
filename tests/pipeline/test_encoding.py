"""The fast signal encoder writes exactly what ``json.dumps`` of ``Signal.to_json`` writes."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import telemetrydeck_async._signal as signal_module
from telemetrydeck_async._signal import SharedPayload, Signal, encode_signal, format_received_at


def reference(signal: Signal, app_id: str) -> bytes:
    """The documented encoding, spelled out with the stdlib."""
    return json.dumps(
        signal.to_json(app_id), separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def reference_time(unix_time: float) -> str:
    """The documented receivedAt format, without any caching."""
    seconds = int(unix_time)
    millis = int((unix_time - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


text = st.text(max_size=20)  # quotes, backslashes, control characters, non-ASCII text
values = st.one_of(
    text, st.integers(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False)
)


def signal_strategy(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Signal]:
    """Signals whose payload values (own and shared) are drawn from ``values``."""
    return st.builds(
        Signal,
        type=text,
        client_user=text,
        session_id=text,
        test_mode=st.booleans(),
        payload=st.dictionaries(text, values, max_size=5),
        float_value=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
        received_at=st.floats(min_value=0, max_value=4e9),
        # The client's shared keys, encoded once; a signal never repeats them in its own payload.
        shared=st.one_of(
            st.none(), st.dictionaries(text, values, max_size=4).map(SharedPayload.of)
        ),
    ).filter(lambda s: s.shared is None or s.shared.items.keys().isdisjoint(s.payload))


signals = signal_strategy(values)


@settings(max_examples=300, database=None)
@given(signal=signals, app_id=text)
def test_fast_encoding_matches_json_dumps(signal: Signal, app_id: str) -> None:
    """Any valid signal encodes to the same bytes as the json.dumps reference."""
    try:
        expected = reference(signal, app_id)
    except UnicodeEncodeError:  # lone surrogates: both paths must refuse them
        with pytest.raises(UnicodeEncodeError):
            encode_signal(signal, app_id)
        return
    assert encode_signal(signal, app_id) == expected


@settings(max_examples=300, database=None)
@given(signal=signals, app_id=text)
def test_stdlib_encoding_matches_json_dumps(signal: Signal, app_id: str) -> None:
    """Without the orjson extra, the stdlib path alone writes the reference bytes."""
    saved = signal_module._orjson_dumps
    signal_module._orjson_dumps = None  # type: ignore[assignment]  # as if orjson were missing
    try:
        try:
            expected = reference(signal, app_id)
        except UnicodeEncodeError:
            with pytest.raises(UnicodeEncodeError):
                encode_signal(signal, app_id)
            return
        assert encode_signal(signal, app_id) == expected
    finally:
        signal_module._orjson_dumps = saved


# Payloads without floats: the ones the orjson path encodes itself (any float goes to stdlib).
plain_values = st.one_of(text, st.integers(min_value=-(2**63), max_value=2**64 - 1), st.booleans())
plain_signals = signal_strategy(plain_values)


@settings(max_examples=500, database=None)
@given(signal=plain_signals, app_id=text)
def test_orjson_encoding_matches_json_dumps(signal: Signal, app_id: str) -> None:
    """The orjson path (the ``fast`` extra) writes byte for byte what json.dumps writes."""
    if signal_module._orjson_dumps is None:
        pytest.skip("orjson is not installed (the 'fast' extra): only the stdlib path exists")
    try:
        expected = reference(signal, app_id)
    except UnicodeEncodeError:  # lone surrogates: orjson refuses them too (the stdlib raises)
        with pytest.raises(UnicodeEncodeError):
            encode_signal(signal, app_id)
        return
    # No float in the payload and nothing orjson refuses: orjson writes the payload itself.
    assert signal_module._payload_with_orjson(signal) is not None
    assert encode_signal(signal, app_id) == expected


def test_orjson_path_leaves_float_payloads_to_the_stdlib() -> None:
    """A float in the signal's own payload is never encoded by orjson, whose format differs."""
    if signal_module._orjson_dumps is None:
        pytest.skip("orjson is not installed (the 'fast' extra)")
    own = Signal("T", "u", "s", False, {"a": 1e-07}, None, 1.0)
    assert signal_module._payload_with_orjson(own) is None
    assert encode_signal(own, "app") == reference(own, "app")
    # Shared keys are encoded once by the stdlib: a float among them is written as it wrote it.
    shared = Signal("T", "u", "s", False, {"a": 1}, 1e16, 1.0, SharedPayload.of({"b": 1e16}))
    assert signal_module._payload_with_orjson(shared) is not None
    assert encode_signal(shared, "app") == reference(shared, "app")


def test_encoded_heads_cache_stays_bounded() -> None:
    """Many distinct users never grow the cache of encoded signal heads past its bound."""
    for n in range(signal_module._HEADS_MAX + 10):
        signal = Signal("T", f"user-{n}", "s", False, {}, None, 1.0)
        assert encode_signal(signal, "app") == reference(signal, "app")
    assert len(signal_module._HEADS) <= signal_module._HEADS_MAX


@settings(max_examples=300, database=None)
@given(unix_time=st.floats(min_value=0, max_value=4e9))
def test_received_at_matches_the_uncached_format(unix_time: float) -> None:
    """The per-second cache never changes the formatted time."""
    assert format_received_at(unix_time) == reference_time(unix_time)
    assert format_received_at(unix_time + 1.5) == reference_time(unix_time + 1.5)


@pytest.mark.parametrize(
    "fields",
    [
        {"float_value": math.nan},
        {"float_value": math.inf},
        {"payload": {"a": math.nan}},
        {"payload": {"a": object()}},
    ],
)
def test_unencodable_signals_raise_like_json_dumps(fields: dict[str, Any]) -> None:
    """Non-finite or unserialisable values raise the error json.dumps raises."""
    base: dict[str, Any] = {
        "type": "T",
        "client_user": "u",
        "session_id": "s",
        "test_mode": False,
        "payload": {},
        "float_value": None,
    }
    signal = Signal(**{**base, **fields}, received_at=1.0)
    with pytest.raises((ValueError, TypeError)) as expected:
        reference(signal, "app")
    with pytest.raises(expected.type, match=str(expected.value)[:20]):
        encode_signal(signal, "app")


def test_odd_field_types_fall_back_to_the_reference() -> None:
    """A non-bool test_mode or an int floatValue is encoded exactly as json.dumps would."""
    signal = Signal("T", "u", "s", 1, {"k": 1}, 2, 1.0)  # type: ignore[arg-type]  # deliberately odd
    assert encode_signal(signal, "app") == reference(signal, "app")
