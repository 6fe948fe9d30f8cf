"""Property tests of the input surface: whatever a caller passes, the outcome is one of two.

Either the signal is queued and the emulator (which checks the wire contract) accepts it, or
the call raises :class:`InvalidSignalError` and nothing was queued. Never another exception,
never a batch the server refuses because of one bad signal, and the client keeps working.

Each test owns one emulator and one client on a private event loop and feeds them every
example hypothesis draws (starting a server per example would make the suite crawl). Every
accepted example is flushed on its own, so a failure points at the example that caused it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import hashlib
import math
import operator
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetrydeck_async import (
    ConfigurationError,
    InvalidSignalError,
    RetryPolicy,
    TelemetryClient,
)
from telemetrydeck_async._signal import RESERVED_KEYS
from telemetrydeck_async.devserver import IngestEmulator

T = TypeVar("T")

SETTINGS = settings(
    max_examples=200,
    deadline=None,  # a flush is a real HTTP round trip; timing is not what is tested here
    suppress_health_check=[HealthCheck.too_slow],
    database=None,  # examples are cheap to find again; keep the tree free of .hypothesis/
)

# ------------------------------------------------------------------------- strategies


class Colour(enum.Enum):
    """An enum whose values are primitives (sent as the value)."""

    RED = "red"
    ONE = 1
    HALF = 0.5
    NAN = math.nan


class Wrapper(enum.Enum):
    """An enum whose value is an enum (refused: there is no primitive in it)."""

    INNER = Colour.RED


class Tag(str):
    """A str subclass, as some libraries hand out (sent as its text)."""

    __slots__ = ()


class Count(int):
    """An int subclass (sent as its int value)."""


class Measure(float):
    """A float subclass (sent as its float value when finite)."""


class ReadOnly(Mapping[Any, Any]):
    """A Mapping that is not a dict."""

    def __init__(self, items: dict[Any, Any]) -> None:
        self._items = items

    def __getitem__(self, key: Any) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def mostly(valid: st.SearchStrategy[Any], *anything: st.SearchStrategy[Any], odds: int = 3) -> Any:
    """Draw from ``valid`` ``odds`` times for every draw from the adversarial strategies.

    Without the bias nearly every example would be refused, and the path that sends a signal
    (the one that can poison a batch) would hardly be exercised.
    """
    adversarial = st.one_of(*anything)
    return st.integers(0, odds).flatmap(lambda pick: adversarial if pick == 0 else valid)


#: Lone surrogates are valid in a Python str but cannot be encoded as UTF-8.
surrogates = st.integers(0xD800, 0xDFFF).map(chr)

texts = st.one_of(
    st.text(),
    st.lists(st.one_of(st.characters(), surrogates)).map("".join),
    st.sampled_from(["", " ", "\t\n", "\x00", "\u2028", "\ufeff", "é", "👩‍💻", "TelemetryDeck."]),
    st.builds(operator.add, st.just("TelemetryDeck."), st.text(max_size=10)),
    # Huge strings, up to a few MB once encoded: some fit in a request, some cannot.
    st.builds(operator.mul, st.characters(), st.integers(0, 700_000)),
)
#: Names as people write them (any unicode but surrogates), rarely empty or reserved.
names = st.text(min_size=1, max_size=40)

timezones = st.sampled_from(
    [
        None,
        dt.timezone.utc,
        dt.timezone(dt.timedelta(hours=14)),  # year 1 here is before year 1 in UTC
        dt.timezone(-dt.timedelta(hours=12)),
    ]
)

numbers = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=-(2**64) - 2, max_value=-(2**63) + 2),
    st.sampled_from([10**400, -(10**400), 10**4000]),
    # Past 4,300 digits even repr() and json.dumps() refuse an int (CVE-2020-10735 limit).
    st.builds(pow, st.just(10), st.just(5000)),
    st.floats(),  # NaN and the infinities included
    st.decimals(),
    st.fractions(),
    st.complex_numbers(),
    st.builds(Count, st.integers()),
    st.builds(Measure, st.floats()),
)

#: Values a payload may hold as they are (or as None, which is skipped).
plain_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=100),
)

atoms = st.one_of(
    st.none(),
    st.booleans(),
    numbers,
    texts,
    st.builds(Tag, st.text()),
    st.binary(),
    st.builds(bytearray, st.binary(max_size=8)),
    st.datetimes(timezones=timezones),
    st.dates(),
    st.times(),
    st.timedeltas(),
    st.sampled_from([*Colour, *Wrapper]),
    st.builds(object),
    st.just(Ellipsis),
)

keys = mostly(
    names,
    texts,
    st.sampled_from(sorted(RESERVED_KEYS)),
    st.integers(),
    st.none(),
    st.binary(max_size=4),
    st.tuples(st.text(max_size=3)),
    st.builds(Tag, st.text(max_size=5)),
)

values = mostly(
    plain_values,
    st.recursive(
        atoms,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.lists(inner, max_size=3).map(tuple),
            st.dictionaries(st.text(max_size=5), inner, max_size=3),
            st.frozensets(st.integers(), max_size=3),
        ),
        max_leaves=5,
    ),
)

mappings = st.dictionaries(keys, values, max_size=6)

payloads = mostly(
    st.dictionaries(names, plain_values, max_size=6),
    mappings,
    mappings.map(MappingProxyType),
    mappings.map(ReadOnly),
    values,  # not a mapping at all
    odds=1,
)

float_values = mostly(
    st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False), st.integers(-99, 99)),
    numbers,
    st.booleans(),
    texts,
    st.binary(max_size=4),
)
users = mostly(
    st.one_of(st.none(), names),
    texts,
    st.integers(),
    st.binary(max_size=8),
    st.builds(Tag, st.text()),
)
session_ids = mostly(st.one_of(st.none(), names), texts, st.integers(), st.binary(max_size=8))
test_modes = mostly(st.one_of(st.none(), st.booleans()), st.integers(0, 1), st.text(max_size=3))
signal_types = mostly(names, texts, st.integers(), st.none(), st.binary(max_size=8), values)

#: A preset method call: (method name, positional arguments, keyword arguments).
PresetCall = tuple[str, tuple[Any, ...], dict[str, Any]]

optional_texts = mostly(st.one_of(st.none(), names), texts, st.integers())
preset_calls = st.one_of(
    st.tuples(
        st.just("error"),
        st.tuples(mostly(names, texts, st.integers(), st.builds(ValueError, texts))),
        st.fixed_dictionaries(
            {},
            optional={
                "message": optional_texts,
                "category": mostly(
                    st.sampled_from(["thrown-exception", "user-input", "app-state"]), texts
                ),
            },
        ),
    ),
    st.tuples(
        st.just("navigation"), st.tuples(mostly(names, texts), mostly(names, texts)), st.just({})
    ),
    st.tuples(
        st.just("purchase_completed"),
        st.tuples(float_values),
        st.fixed_dictionaries(
            {
                "purchase_type": mostly(
                    st.sampled_from(["subscription", "one-time-purchase"]), texts
                )
            },
            optional={"product_id": optional_texts, "currency_code": optional_texts},
        ),
    ),
    st.tuples(
        st.sampled_from(["user_acquired", "lead_started", "lead_converted", "core_feature_used"]),
        st.tuples(mostly(names, texts, st.integers())),
        st.just({}),
    ),
    st.tuples(
        st.sampled_from(["onboarding_completed", "new_install_detected"]),
        st.just(()),
        st.fixed_dictionaries({}, optional={"payload": payloads, "client_user": users}),
    ),
)

# ------------------------------------------------------------------------- harness

RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, deadline=5.0)


class Harness:
    """One emulator and one client on a private event loop, shared by every example of a test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.emulator = IngestEmulator(host="127.0.0.1", port=0)
        self.run(self.emulator.start())
        self.td = self.new_client()

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` to completion on the harness loop."""
        return self.loop.run_until_complete(awaitable)

    def new_client(self, **options: Any) -> TelemetryClient:
        """A client aimed at the emulator that only sends when flushed."""
        options.setdefault("namespace", "com.example")
        options.setdefault("default_user", "default-user")
        return TelemetryClient(
            options.pop("app_id", "property-app"),
            base_url=self.emulator.base_url,
            flush_interval=3600.0,
            retry=RETRY,
            **options,
        )

    async def attempt(
        self, td: TelemetryClient, preset: PresetCall | None = None, **arguments: Any
    ) -> dict[str, Any] | None:
        """Send one signal: return it as the emulator received it, or None if it was refused.

        ``td.signal(**arguments)``, or with ``preset=(name, args, kwargs)`` that preset method.
        Any exception other than InvalidSignalError propagates and fails the test.
        """
        before = td.stats
        refused: InvalidSignalError | None = None
        try:
            if preset is None:
                await td.signal(**arguments)
            else:
                name, args, kwargs = preset
                await getattr(td, name)(*args, **kwargs)
        except InvalidSignalError as exc:
            refused = exc
        if refused is not None:
            assert refused.field, "the error names the offending argument"
            assert td.stats.enqueued == before.enqueued, "a refused signal was queued"
            return None
        received = len(self.emulator.signals)
        result = await td.flush(timeout=30)
        stats = td.stats
        assert result.sent == 1, (result, stats.last_error)
        assert stats.dropped == {}, (stats.dropped, stats.last_error)
        assert len(self.emulator.signals) == received + 1
        return self.emulator.signals[-1]

    async def canary(self, td: TelemetryClient) -> None:
        """A plain signal still goes through: the client was not broken by what came before."""
        got = await self.attempt(td, signal_type="Property.canary", payload={"Canary.ok": True})
        assert got is not None
        assert got["payload"]["Canary.ok"] is True

    def close(self) -> None:
        """Check the client still works and lost nothing, then close it and the emulator."""
        try:
            self.run(self.canary(self.td))
            assert self.td.stats.dropped == {}
            assert all(request.status == 200 for request in self.emulator.requests)
        finally:
            try:
                result = self.run(self.td.aclose(timeout=10))
                self.run(self.emulator.stop())
            finally:
                self.loop.close()
        assert result.dropped == {}


@pytest.fixture
def harness() -> Iterator[Harness]:
    """A fresh emulator and client for one property test (shared by all its examples)."""
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def _is_plain(value: object) -> bool:
    """A value the client must send exactly as given."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) in (str, int, bool)


# ------------------------------------------------------------------------- properties


def test_signal_types_are_sent_or_refused(harness: Harness) -> None:
    """Any signal type: sent under that exact name, or InvalidSignalError."""

    @SETTINGS
    @given(signal_type=signal_types)
    def check(signal_type: Any) -> None:
        got = harness.run(harness.attempt(harness.td, signal_type=signal_type))
        if got is not None:
            assert got["type"] == signal_type

    check()


def test_payloads_are_sent_or_refused(harness: Harness) -> None:
    """Any payload: sent with its plain values intact, or InvalidSignalError."""

    @SETTINGS
    @given(payload=payloads)
    def check(payload: Any) -> None:
        got = harness.run(
            harness.attempt(harness.td, signal_type="Property.payload", payload=payload)
        )
        if got is None:
            return
        sent = got["payload"]
        for key, value in dict(payload or {}).items():
            if value is None:
                assert key not in sent
            elif _is_plain(value):
                assert sent[key] == value
                assert type(sent[key]) is type(value)
            else:
                assert key in sent

    check()


def test_float_values_are_sent_or_refused(harness: Harness) -> None:
    """Any float_value: sent as a finite top-level floatValue, or InvalidSignalError."""

    @SETTINGS
    @given(float_value=float_values)
    def check(float_value: Any) -> None:
        got = harness.run(
            harness.attempt(harness.td, signal_type="Property.value", float_value=float_value)
        )
        if got is None:
            return
        if float_value is None:
            assert "floatValue" not in got
        else:
            assert math.isfinite(got["floatValue"])
            assert got["floatValue"] == float(float_value)

    check()


def test_users_sessions_and_test_modes_are_sent_or_refused(harness: Harness) -> None:
    """Any client_user, session_id and test_mode: sent (the user hashed), or InvalidSignalError."""

    @SETTINGS
    @given(client_user=users, session_id=session_ids, test_mode=test_modes)
    def check(client_user: Any, session_id: Any, test_mode: Any) -> None:
        got = harness.run(
            harness.attempt(
                harness.td,
                signal_type="Property.user",
                client_user=client_user,
                session_id=session_id,
                test_mode=test_mode,
            )
        )
        if got is None:
            return
        raw_user = "default-user" if client_user is None else client_user
        assert got["clientUser"] == hashlib.sha256(raw_user.encode()).hexdigest()
        if session_id is not None:
            assert got["sessionID"] == session_id
        assert got["isTestMode"] is bool(test_mode)

    check()


def test_any_combination_of_arguments_is_sent_or_refused(harness: Harness) -> None:
    """Everything at once, with signal_nowait() too: the same two outcomes, and nothing else."""

    @SETTINGS
    @given(
        signal_type=signal_types,
        client_user=users,
        session_id=session_ids,
        payload=st.one_of(st.none(), payloads),
        float_value=float_values,
        test_mode=test_modes,
    )
    def check(**arguments: Any) -> None:
        harness.run(harness.attempt(harness.td, **arguments))

    check()


def test_presets_are_sent_or_refused(harness: Harness) -> None:
    """Any arguments to the preset methods: a TelemetryDeck.* signal, or InvalidSignalError."""

    @SETTINGS
    @given(preset=preset_calls)
    def check(preset: PresetCall) -> None:
        got = harness.run(harness.attempt(harness.td, preset=preset))
        if got is not None:
            assert got["type"].startswith("TelemetryDeck.") or preset[0] == "error"

    check()


def test_client_options_build_a_working_client_or_raise_configuration_error(
    harness: Harness,
) -> None:
    """Any identity options: a client whose signals are accepted, or ConfigurationError."""
    build: Callable[..., TelemetryClient] = harness.new_client

    @settings(SETTINGS, max_examples=100)
    @given(
        app_id=mostly(names, texts, st.integers()),
        namespace=mostly(
            st.one_of(st.none(), st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,3}", fullmatch=True)),
            texts,
        ),
        salt=mostly(st.text(), texts, st.none()),
        default_user=mostly(st.one_of(st.none(), names), texts),
        session_id=mostly(st.one_of(st.none(), names), texts),
        default_payload=st.one_of(st.none(), payloads),
    )
    def check(**options: Any) -> None:
        try:
            td = build(**options)
        except ConfigurationError as exc:
            refused: ConfigurationError | None = exc
        else:
            refused = None
        if refused is not None:
            assert refused.option in options
            return

        async def use() -> None:
            try:
                await harness.attempt(td, signal_type="Property.options", client_user="someone")
            finally:
                await td.aclose(timeout=10)

        harness.run(use())

    check()
