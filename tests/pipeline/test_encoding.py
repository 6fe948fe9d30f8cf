"""The fast signal encoder writes exactly what ``json.dumps`` of ``Signal.to_json`` writes."""

from __future__ import annotations

import gc
import json
import math
import time
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import telemetrydeck_async._signal as signal_module
from telemetrydeck_async import InvalidSignalError, TelemetryClient
from telemetrydeck_async._batcher import Batch, Batcher
from telemetrydeck_async._signal import (
    CheckedPayload,
    SharedPayload,
    Signal,
    encode_signal,
    format_received_at,
)


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
        body=st.none(),  # not encoded yet: the encoder under test does it
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
    assert encode_signal(signal, app_id) == expected
    # Told there is no float (as the client's checks tell it), orjson writes the payload.
    assert signal_module.encode_fields(app_id, signal[:8], False) == expected


def test_orjson_path_leaves_float_payloads_to_the_stdlib() -> None:
    """A float in the signal's own payload is never encoded by orjson, whose format differs."""
    if signal_module._orjson_dumps is None:
        pytest.skip("orjson is not installed (the 'fast' extra)")
    own = Signal("T", "u", "s", False, {"a": 1e-07}, None, 1.0)
    assert signal_module._orjson_dumps(own.payload) == b'{"a":1e-7}'  # what is avoided
    assert encode_signal(own, "app") == reference(own, "app")
    assert b'"a":1e-07}' in encode_signal(own, "app")
    # A caller that says there is no float is trusted: the client's checks know.
    assert b'"a":1e-7}' in signal_module.encode_fields("app", own[:8], False)
    # Shared keys are encoded once by the stdlib: a float among them is written as it wrote it.
    shared = Signal("T", "u", "s", False, {"a": 1}, 1e16, 1.0, SharedPayload.of({"b": 1e16}))
    assert encode_signal(shared, "app") == reference(shared, "app")


# floatValues around and inside the range orjson writes (plain decimals, 1e-4 to 1e16), both signs.
_EDGES = [
    sign * x
    for edge in (1e-4, 1e16)
    for x in (edge, math.nextafter(edge, 0.0), math.nextafter(edge, math.inf))
    for sign in (1.0, -1.0)
]
_near_range = st.one_of(
    st.floats(min_value=1e-6, max_value=1e18),
    st.floats(min_value=-1e18, max_value=-1e-6),
    st.sampled_from(_EDGES),
)


@settings(max_examples=500, database=None)
@given(float_value=_near_range, received_at=st.floats(min_value=0, max_value=4e9))
def test_float_values_are_written_as_the_stdlib_writes_them(
    float_value: float, received_at: float
) -> None:
    """A floatValue orjson writes (the ``fast`` extra) has the stdlib's digits and format."""
    signal = Signal("T", "u", "s", False, {"k": "v"}, float_value, received_at)
    expected = reference(signal, "app")
    assert encode_signal(signal, "app") == expected
    saved = signal_module._orjson_dumps
    signal_module._orjson_dumps = None  # type: ignore[assignment]  # as if orjson were missing
    try:
        assert encode_signal(signal, "app") == expected
    finally:
        signal_module._orjson_dumps = saved


def test_float_value_edges_take_the_path_that_writes_them_alike() -> None:
    """Where orjson's float format differs from the stdlib's, the stdlib writes floatValue."""
    if signal_module._orjson_dumps is None:
        pytest.skip("orjson is not installed (the 'fast' extra)")
    assert signal_module._ORJSON_FLOATS  # the installed release agrees on the range's samples
    # What is avoided: below 1e-4 the two formats differ.
    assert signal_module._orjson_dumps(1e-05) != float.__repr__(1e-05).encode()
    for value in (1e-05, 9.9e-05, 1e-07, -1e-05, 1e16, 1.5e300, 0.0, -0.0, 2e-308):
        signal = Signal("T", "u", "s", False, {}, value, 1.0)
        body = encode_signal(signal, "app")
        assert body == reference(signal, "app")
        assert body.endswith(b',"floatValue":' + float.__repr__(value).encode() + b"}")


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
    # The client's read-only "no payload", alone and beside shared keys: the empty object.
    for shared in (None, SharedPayload.of({}), SharedPayload.of({"b": "x"})):
        empty = Signal("T", "u", "s", False, MappingProxyType({}), None, -1.5, shared)
        assert encode_signal(empty, "app") == reference(empty._replace(payload={}), "app")


def reference_body(signals: list[Signal], app_id: str) -> bytes:
    """The request body the reference writes: a JSON array of the signals' reference bytes."""
    return b"[" + b",".join(reference(signal, app_id) for signal in signals) + b"]"


def _queued(n: int, pad: int = 0) -> list[Signal]:
    shared = SharedPayload.of({"TelemetryDeck.SDK.name": "x"})
    return [
        Signal("T", f"u{i % 3}", "s", False, {"i": i, "p": "p" * pad}, None, 1e9 + i / 7, shared)
        for i in range(n)
    ]


def _take_all(batcher: Batcher, signals: list[Signal]) -> list[Batch]:
    for signal in signals:
        assert batcher.put(signal)
    return batcher.drain()


def test_batches_carry_the_reference_bodies_times_and_halves() -> None:
    """Batches cut from the queue hold the reference bytes and times, in order, and so do halves."""
    signals = _queued(250)
    batches = _take_all(Batcher("app", 100, 1 << 20, 1000), signals)
    assert [len(b) for b in batches] == [100, 100, 50]
    assert [b.seq for b in batches] == [0, 100, 200]
    expected = [reference(signal, "app") for signal in signals]
    assert b"".join(b.payload() for b in batches) == b"".join(
        reference_body(signals[k : k + 100], "app") for k in (0, 100, 200)
    )
    assert [body for b in batches for body in b.bodies] == expected
    assert [t for b in batches for t in b.received_at] == [s.received_at for s in signals]
    first, second = batches[0].split()  # a 413 or 400: the halves are sent on their own
    assert first.payload() + second.payload() == (
        reference_body(signals[:50], "app") + reference_body(signals[50:100], "app")
    )


def test_byte_budget_is_kept_when_signals_are_large() -> None:
    """Past max_batch_bytes a batch is cut short: no body over the limit, none lost or reordered."""
    signals = _queued(40, pad=300)
    batches = _take_all(Batcher("app", 100, 4096, 1000), signals)
    assert len(batches) > 1
    assert all(len(b.payload()) <= 4096 for b in batches)
    assert all(len(b.payload()) > 4096 - 400 for b in batches[:-1])  # each one filled up
    assert [body for b in batches for body in b.bodies] == [reference(s, "app") for s in signals]
    assert [b.seq for b in batches] == [
        sum(len(b) for b in batches[:k]) for k in range(len(batches))
    ]


def test_queued_signals_add_no_objects_the_garbage_collector_tracks() -> None:
    """A queue filled by a burst holds nothing the collector scans: no dict or tuple per signal."""
    batcher = Batcher("app", 100, 1 << 20, 10_000)
    shared = SharedPayload.of({"TelemetryDeck.SDK.name": "x"})
    gc.collect()
    before = len(gc.get_objects())
    for i in range(5_000):
        assert batcher.put(Signal("T", "u", "s", False, {"i": i, "p": "pro"}, None, 1e9, shared))
    gc.collect()
    # A few objects may come and go meanwhile; one per queued signal would be 5,000.
    assert len(gc.get_objects()) - before < 100
    assert len(batcher) == 5_000


def test_spool_ids_of_written_ahead_signals_follow_them_into_their_batches() -> None:
    """Signals written ahead keep their spool record ids, by position, through cutting."""
    batcher = Batcher("app", 3, 1 << 20, 100)
    for n, signal in enumerate(_queued(7)):
        assert batcher.put(signal, spool_id=100 + n if n % 2 else None)
    batches = batcher.drain()
    assert [b.spool_ids for b in batches] == [[None, 101, None], [103, None, 105], None]
    assert [b.written_ids() for b in batches] == [[101], [103, 105], []]


def _hook_adds_a_float(view: dict[str, Any]) -> dict[str, Any]:
    return {**view, "payload": {**view["payload"], "Hook.ratio": 1e-07}}


# Clients whose signals take each path of the encoder: own keys beside the shared ones, keys
# that override a default (merged, no shared fragment), keys a hook rewrote.
_CLIENTS = [
    TelemetryClient("app", base_url="http://127.0.0.1:9", default_payload={"Default.rate": 0.5}),
    TelemetryClient(
        "app", base_url="http://127.0.0.1:9", default_payload={"k": 1e16}, payload_prefix="P."
    ),
    TelemetryClient("app", base_url="http://127.0.0.1:9", before_send=_hook_adds_a_float),
    # Neither: a call's plain payload is encoded as the caller wrote it (plain_members).
    TelemetryClient("app", base_url="http://127.0.0.1:9"),
]
_keys = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8).filter(
    lambda key: not key.startswith("TelemetryDeck.") and key not in signal_module.RESERVED_KEYS
)
_client_payloads = st.dictionaries(
    st.one_of(_keys, st.just("k")),
    st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    max_size=5,
)


@settings(max_examples=300, database=None)
@given(
    client=st.sampled_from(_CLIENTS),
    payload=_client_payloads,
    float_value=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
)
def test_client_built_signals_carry_their_reference_bytes(
    client: TelemetryClient, payload: dict[str, Any], float_value: float | None
) -> None:
    """The bytes a signal is queued with are json.dumps of its fields, whatever path built it."""
    signal = client._build("App.event", "user", None, payload, float_value, None)
    assert signal is not None
    assert signal.body == reference(signal._replace(body=None), "app")
    assert encode_signal(signal, "app") is signal.body  # encoded once, then reused
    # The same payload checked and encoded once (as the web integrations send theirs).
    checked = client._build("App.event", "user", None, CheckedPayload(payload), float_value, None)
    assert checked is not None
    assert checked.body == reference(checked._replace(body=None), "app")


def test_checked_payloads_are_checked_once_and_encode_like_plain_ones() -> None:
    """A CheckedPayload refuses what a call would, and empty or not encodes as a dict does."""
    with pytest.raises(InvalidSignalError, match="reserved"):
        CheckedPayload({"appID": "x"})
    client = TelemetryClient("app", base_url="http://127.0.0.1:9", default_payload={"D.k": 1})
    for items in ({}, {"a": "b", "n": 1.5e-07}):
        checked = CheckedPayload(items)
        assert dict(checked) == items
        assert len(checked) == len(items)
        signal = client._build("App.event", "user", None, checked, 2.5, None)
        assert signal is not None
        assert signal.body == reference(signal._replace(body=None), "app")


class _Text(str):
    """A str subclass: equal to (and hashed like) its plain text, refused as a payload key."""

    __slots__ = ()


# Anything a caller may pass in a payload: ints past 64 bits, lone surrogates, str subclasses
# (as keys and values), None, floats, besides the plain values the shortcut encodes as they are.
_odd_keys = st.one_of(_keys, st.just("k"), st.text(max_size=3), st.just("k").map(_Text))
_odd_values = st.one_of(
    st.text(max_size=6),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3).map(_Text),
)
_PLAIN_CLIENT = TelemetryClient("app", base_url="http://127.0.0.1:9")


def _plain(payload: dict[Any, Any]) -> bool:
    """Whether the shortcut may take ``payload``: exact str keys and exact str/int/bool values
    that need no normalising (ints within 64 bits, no lone surrogate)."""
    return all(
        type(key) is str
        and (
            (type(value) is str and signal_module.lone_surrogate(value) is None)
            or type(value) is bool
            or (type(value) is int and -(2**63) <= value <= 2**64 - 1)
        )
        for key, value in payload.items()
    )


@settings(max_examples=300, database=None)
@given(payload=st.dictionaries(_odd_keys, _odd_values, max_size=4))
def test_plain_payload_shortcut_encodes_or_refuses_as_the_full_path(
    payload: dict[Any, Any],
) -> None:
    """A call's payload is encoded, or refused with the same field and reason, as normalising
    it first would; a plain one (known keys, str/int/bool values) is encoded as it is."""
    try:
        expected = signal_module.normalize_payload(payload)
    except InvalidSignalError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        for _ in range(2):  # refused each time, nothing remembered as good
            with pytest.raises(InvalidSignalError) as refused:
                _PLAIN_CLIENT._build("App.event", "user", None, payload, None, None)
            assert (refused.value.field, refused.value.reason) == (error.field, error.reason)
        return
    # The keys are known now (normalize_payload checked them): a plain payload takes the
    # shortcut, and the signal refers to the caller's dict rather than a copy.
    signal = _PLAIN_CLIENT._build("App.event", "user", None, payload, None, None)
    assert signal is not None
    assert signal.body == reference(signal._replace(payload=expected, body=None), "app")
    if signal_module._orjson_dumps is not None:
        assert (signal.payload is payload) == (bool(payload) and _plain(payload))


def test_plain_payload_shortcut_is_left_to_the_full_path_without_orjson() -> None:
    """Without the orjson extra, a plain payload is normalised and encoded by the stdlib."""
    payload = {"Plain.key": "v", "Plain.n": 2**64 - 1}
    signal_module.normalize_payload(payload)  # its keys known
    saved = signal_module._orjson_dumps
    signal_module._orjson_dumps = None  # type: ignore[assignment]  # as if orjson were missing
    try:
        assert signal_module.plain_members(payload) is None
        signal = _PLAIN_CLIENT._build("App.event", "user", None, payload, None, None)
    finally:
        signal_module._orjson_dumps = saved
    assert signal is not None
    assert signal.payload is not payload
    assert signal.body == reference(signal._replace(body=None), "app")


def test_batcher_events_fire_at_their_queue_lengths_and_put_total_follows() -> None:
    """The flusher is woken when the queue stops being empty and when a batch fills; callers
    are held back once it is full; put_total counts every signal put, taken or not."""
    batcher = Batcher("app", 3, 1 << 20, 5)
    signals = _queued(7)
    batcher.wakeup.clear()
    woken = []
    for signal in signals[:5]:
        assert batcher.space.is_set()
        assert batcher.put(signal)
        woken.append(batcher.wakeup.is_set())
        batcher.wakeup.clear()
    assert woken == [True, False, True, False, False]
    assert not batcher.space.is_set()
    assert not batcher.put(signals[5])  # full: refused, nothing appended
    assert (batcher.put_total, batcher.taken_total, len(batcher)) == (5, 0, 5)
    batch = batcher.take()
    assert batch is not None
    assert len(batch) == 3
    assert batcher.space.is_set()
    assert batcher.put(signals[5])
    assert (batcher.put_total, batcher.taken_total, len(batcher)) == (6, 3, 3)


def test_received_at_near_the_epoch_skips_the_cached_second() -> None:
    """Times before second 1 (where int() rounds -0.5 and 0.5 to the same second) are never
    served from the cached second: each is written as the uncached format writes it."""
    for unix_time in (1.5, 0.5, -0.5, 0.25, -1.5, 1.999, 0.999, -0.25, 1.0, 0.0):
        signal = Signal("T", "u", "s", False, {}, None, unix_time)
        expected = f'"receivedAt":"{reference_time(unix_time)}"'.encode()
        assert expected in encode_signal(signal, "app")
        assert format_received_at(unix_time) == reference_time(unix_time)
