"""The fast signal encoder writes exactly what ``json.dumps`` of ``Signal.to_json`` writes."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
signals = st.builds(
    Signal,
    type=text,
    client_user=text,
    session_id=text,
    test_mode=st.booleans(),
    payload=st.dictionaries(text, values, max_size=5),
    float_value=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
    received_at=st.floats(min_value=0, max_value=4e9),
    # The client's shared keys, encoded once; a signal never repeats them in its own payload.
    shared=st.one_of(st.none(), st.dictionaries(text, values, max_size=4).map(SharedPayload.of)),
).filter(lambda s: s.shared is None or s.shared.items.keys().isdisjoint(s.payload))


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
