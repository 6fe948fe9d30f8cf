"""The wire model: one signal, its validation, and its JSON form.

Validation happens synchronously in ``signal()``, before anything is enqueued, so a bad call
raises :class:`~telemetrydeck_async.exceptions.InvalidSignalError` and costs nothing.
A signal is encoded to its JSON bytes once, as the client builds it (``Signal.body``): the
queue then holds bytes and floats, which the garbage collector does not track, however long a
burst is, and a batch is only joined and sent.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import json
import math
import numbers
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from json.encoder import encode_basestring as _json_str
from typing import Any, Final, NamedTuple, cast

import attrs

from .exceptions import InvalidSignalError

try:
    # The optional accelerator (``pip install 'telemetrydeck-async[fast]'``): a C JSON encoder
    # about ten times faster than the stdlib's on a payload. Used only where its output is
    # byte for byte the stdlib's (tests/pipeline/test_encoding.py checks it with hypothesis).
    from orjson import dumps as _orjson_dumps
except ImportError:  # pragma: no cover - exercised by the suite run without the extra
    _orjson_dumps = None  # type: ignore[assignment]  # the stdlib path is used

__all__ = [
    "RESERVED_KEYS",
    "SDK_KEY_PREFIX",
    "CheckedPayload",
    "PayloadValue",
    "SharedPayload",
    "Signal",
    "SignalFields",
    "UserHasher",
    "check_utf8",
    "encode_batch",
    "encode_checked",
    "encode_fields",
    "encode_members",
    "encode_signal",
    "format_received_at",
    "lone_surrogate",
    "new_signal",
    "normalize_flagged",
    "normalize_payload",
    "plain_members",
    "validate_type",
]

PayloadValue = str | int | float | bool

#: Top-level names of the signal object; the server refuses them as payload keys (SPEC.md).
RESERVED_KEYS: Final = frozenset(
    {
        "appID",
        "clientUser",
        "type",
        "receivedAt",
        "count",
        "isTestMode",
        "sessionID",
        "floatValue",
        "payload",
        "platform",
        "__time",
    }
)

#: Keys and types with this prefix belong to the SDKs and the server; callers may not set them.
SDK_KEY_PREFIX: Final = "TelemetryDeck."

# Exact-type checks are faster than isinstance chains on the hot path; bool is a subclass of int,
# so an exact check also keeps it apart from numbers where that matters (floatValue).
_PASS_THROUGH: Final = frozenset({str, int, bool})

# Payload ints must fit in 64 bits: the ingest server (and most JSON readers) cannot hold more,
# and past 4,300 digits Python's own json.dumps refuses them, which would fail a whole batch.
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1

# Between a signal's time and its own payload keys on the wire: the payload's opening brace.
_PAYLOAD_OPENING: Final = b'","payload":{'


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text``, or None when all of it can be encoded as UTF-8.

    A Python str may hold lone surrogates (``os.fsdecode`` of undecodable bytes, the
    ``surrogateescape`` handler, a JSON ``"\\ud800"``), but a request body cannot: one such
    signal would fail its whole batch in the background. ASCII text, the usual case, is
    recognised in constant time.
    """
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return text[exc.start]
    return None


#: The one wording for an optional text argument or option that is empty or not a str.
NOT_OPTIONAL_TEXT: Final = "must be a non-empty str or None"


def check_optional_text(
    field: str,
    value: object,
    error: Callable[[str, str], Exception] = InvalidSignalError,
    *,
    exact: bool = False,
) -> None:
    """Raise ``error(field, reason)`` unless ``value`` is None or a non-empty str.

    ``exact``: a str subclass is refused too (where the value is written as is, e.g. a
    session id). ``error``: ``ConfigurationError`` for an option.
    """
    if value is None or ((type(value) is str if exact else isinstance(value, str)) and value):
        return
    raise error(field, NOT_OPTIONAL_TEXT)


def check_utf8(field: str, text: str) -> None:
    """Raise ``InvalidSignalError`` for ``field`` if ``text`` holds a lone surrogate."""
    bad = lone_surrogate(text)
    if bad is not None:
        raise InvalidSignalError(
            field, f"contains the lone surrogate {bad!r}, which cannot be encoded as UTF-8"
        )


def validate_type(signal_type: object, *, allow_reserved: bool = False) -> str:
    """Return ``signal_type`` if it is a usable signal type, else raise ``InvalidSignalError``."""
    if type(signal_type) is not str:
        raise InvalidSignalError("type", f"must be a str, got {type(signal_type).__name__}")
    if not signal_type or signal_type.isspace():
        raise InvalidSignalError("type", "must be a non-empty string")
    check_utf8("type", signal_type)
    if not allow_reserved and signal_type.startswith(SDK_KEY_PREFIX):
        raise InvalidSignalError(
            "type", f"{signal_type!r}: types beginning with {SDK_KEY_PREFIX!r} are reserved"
        )
    return signal_type


def _normalize_value(key: str, value: object) -> PayloadValue | None:
    """Turn one payload value into a JSON primitive, or raise naming the key."""
    kind = type(value)
    if kind in _PASS_THROUGH:
        if kind is str:
            check_utf8(f"payload[{key!r}]", value)  # type: ignore[arg-type]  # kind is str
        elif kind is int and not _INT_MIN <= value <= _INT_MAX:  # type: ignore[operator]  # int
            raise InvalidSignalError(
                f"payload[{key!r}]",
                f"ints must fit in 64 bits ({_INT_MIN} to {_INT_MAX}); send larger ones as a str",
            )
        return value  # type: ignore[return-value]  # the exact-type check above narrows it
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]  # kind is float
            raise InvalidSignalError(f"payload[{key!r}]", f"must be finite, got {value!r}")
        return value  # type: ignore[return-value]  # kind is float
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            try:
                value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
            except OverflowError:  # e.g. year 1 at UTC+14: no such time in UTC
                raise InvalidSignalError(
                    f"payload[{key!r}]", "is outside the range of datetime once in UTC"
                ) from None
            return value.isoformat(timespec="milliseconds") + "Z"
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        inner = value.value
        if isinstance(inner, enum.Enum):
            raise InvalidSignalError(f"payload[{key!r}]", "an enum whose value is an enum")
        return _normalize_value(key, inner)
    if isinstance(value, str):  # a str subclass: send its plain text
        return _normalize_value(key, str.__str__(value))
    if isinstance(value, numbers.Integral):  # int subclasses, numpy integers
        return _normalize_value(key, int(value))
    if isinstance(value, numbers.Real):  # floats, numpy floats, Fraction (not Decimal)
        try:
            as_float = float(value)
        except OverflowError:  # e.g. a Fraction too large for a float
            raise InvalidSignalError(f"payload[{key!r}]", "is too large for a float") from None
        return _normalize_value(key, as_float)
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        raise InvalidSignalError(
            f"payload[{key!r}]",
            f"must be a str, int, float or bool; nested {type(value).__name__} is not allowed "
            "(payloads are flat: use one key per value, e.g. 'Cart.items')",
        )
    raise InvalidSignalError(
        f"payload[{key!r}]", f"must be a str, int, float or bool, got {type(value).__name__}"
    )


# Payload keys found valid once (str, non-empty, encodable, not reserved): services send the
# same few keys again and again, so each is checked once. Bounded: cleared when full. A set's
# add and lookup are atomic, so callers in other threads (signal_threadsafe) may share it.
_GOOD_KEYS: Final[set[str]] = set()
_GOOD_KEYS_MAX: Final = 4096


def _check_key(key: object, allow_reserved: bool) -> None:
    """Raise ``InvalidSignalError`` for a payload key the server would refuse."""
    if type(key) is not str:
        raise InvalidSignalError("payload", f"keys must be str, got {type(key).__name__}")
    reserved = key.startswith(SDK_KEY_PREFIX) or key in RESERVED_KEYS
    if reserved and not allow_reserved:
        if key.startswith(SDK_KEY_PREFIX):
            raise InvalidSignalError(
                f"payload[{key!r}]",
                f"keys beginning with {SDK_KEY_PREFIX!r} are reserved for the SDK",
            )
        raise InvalidSignalError(f"payload[{key!r}]", "is a reserved top-level signal field name")
    if not key:
        raise InvalidSignalError("payload", "keys must be non-empty strings")
    if not key.isascii():
        check_utf8(f"payload[{key!r}]", key)
    if not reserved:
        if len(_GOOD_KEYS) >= _GOOD_KEYS_MAX:
            _GOOD_KEYS.clear()
        _GOOD_KEYS.add(key)


def normalize_flagged(
    payload: object, *, allow_reserved: bool = False
) -> tuple[dict[str, PayloadValue], bool]:
    """:func:`normalize_payload`, and whether any value of the result is a float.

    The flag is for the encoder, made in the same pass: orjson (the ``fast`` extra) writes
    every other value exactly as the stdlib does, and floats differently.
    """
    # This runs on every signal() call: a plain dict skips the ABC check, a known key skips its
    # checks, plain str/int/bool values skip the call to _normalize_value.
    if type(payload) is not dict and not isinstance(payload, Mapping):
        raise InvalidSignalError("payload", f"must be a mapping, got {type(payload).__name__}")
    out: dict[str, PayloadValue] = {}
    floats = False
    good = _GOOD_KEYS
    for key, value in payload.items():
        if type(key) is not str or key not in good:
            _check_key(key, allow_reserved)
        kind = type(value)
        if (kind is str and value.isascii()) or (
            kind is bool or (kind is int and _INT_MIN <= value <= _INT_MAX)
        ):
            out[key] = value
            continue
        # Everything else, and the plain values past a limit (a lone surrogate, an int past
        # 64 bits), takes the slow path, which normalises the value or raises the reason.
        normalized = _normalize_value(key, value)
        if normalized is not None:
            out[key] = normalized
            floats = floats or type(normalized) is float
    return out, floats


def normalize_payload(payload: object, *, allow_reserved: bool = False) -> dict[str, PayloadValue]:
    """Validate a caller's payload and return a fresh flat dict of JSON primitives.

    ``None`` values are dropped, ``datetime``/``date`` values become ISO-8601 strings; anything
    nested, binary, non-finite or keyed by a reserved name raises ``InvalidSignalError``.
    """
    return normalize_flagged(payload, allow_reserved=allow_reserved)[0]


class CheckedPayload(Mapping[str, PayloadValue]):
    """A payload checked and encoded once, for a caller that sends it again and again.

    The web integrations send one of a few payloads (route, method, status class) on every
    request: each is made once, and a signal carrying it skips the payload's checks and its
    encoding (``members``: its JSON members as the stdlib writes them, closing brace
    included; empty for no keys). Read-only, like the signals that share it.
    """

    __slots__ = ("_items", "floats", "members")

    def __init__(self, payload: Mapping[str, object]) -> None:
        items, floats = normalize_flagged(payload)
        self._items = items
        #: Whether a value is a float (the encoder's question, answered once).
        self.floats = floats
        self.members = _encode_object(items)[1:].encode() if items else b""

    def __getitem__(self, key: str) -> PayloadValue:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"CheckedPayload({self._items!r})"


def validate_float_value(value: object) -> float:
    """Return ``value`` as a finite float, else raise ``InvalidSignalError`` for ``float_value``."""
    kind = type(value)
    try:
        if kind is float or kind is int:
            number = float(value)  # type: ignore[arg-type]  # kind checked above
        elif kind is not bool and isinstance(value, (int, float)):
            number = float(value)
        else:
            raise InvalidSignalError("float_value", f"must be a number, got {kind.__name__}")
    except OverflowError:  # an int past the largest float
        raise InvalidSignalError("float_value", "is too large for a float") from None
    if not math.isfinite(number):
        raise InvalidSignalError("float_value", f"must be finite, got {value!r}")
    return number


@attrs.frozen(slots=True)
class SharedPayload:
    """Payload keys every signal of a client carries (SDK parameters, ``default_payload``).

    Encoded once per client, so each signal pays only for its own keys: ``fragment`` is the
    JSON members of ``items`` without the braces, exactly as the encoder would write them.
    """

    items: Mapping[str, PayloadValue]
    fragment: str
    #: What follows a signal's time on the wire when its own payload has keys: the payload's
    #: opening brace and the shared members, with the comma before the signal's own.
    opening: bytes = _PAYLOAD_OPENING
    #: The whole payload, closing brace included, of a signal with no keys of its own.
    alone: bytes = _PAYLOAD_OPENING + b"}"

    @classmethod
    def of(cls, items: Mapping[str, PayloadValue]) -> SharedPayload:
        """Encode ``items`` once."""
        fragment = _encode_object(dict(items))[1:-1]
        encoded = fragment.encode()
        return cls(
            dict(items),
            fragment,
            _PAYLOAD_OPENING + encoded + b"," if encoded else _PAYLOAD_OPENING,
            _PAYLOAD_OPENING + encoded + b"}",
        )


class Signal(NamedTuple):
    """One validated signal, as it sits in the queue.

    ``client_user`` is already the hash; the raw user id never reaches this object.
    ``received_at`` is the Unix time at which ``signal()`` was called: it is formatted only when
    the batch is encoded, and stays the same across queueing, retries and the spool.
    ``payload`` holds the signal's own keys (for a plain dict a call passed, that dict itself,
    not a copy: see :func:`plain_members`; the body is encoded from it at once, and the
    pipeline only ever reads a built signal's body); ``shared``, when set, the client's keys
    that come first on the wire (none of them is repeated in ``payload``). ``body`` is the
    signal's bytes on the wire, for its client's app ID, encoded once as the client built it
    (and checked against the batch size there); None for a signal made otherwise, which
    :func:`encode_signal` encodes when asked. A copy with other fields must leave it None.

    A named tuple rather than the house's ``attrs.frozen`` class: one is built on every
    ``signal()`` call, and a frozen attrs class sets each field through
    ``object.__setattr__`` (benchmarks/: about 1 us of the call), where a tuple is built in
    one step (``new_signal``). It is as immutable, and as small in memory.
    """

    type: str
    client_user: str
    session_id: str
    test_mode: bool
    payload: Mapping[str, PayloadValue]
    float_value: float | None
    received_at: float
    shared: SharedPayload | None = None
    body: bytes | None = None

    def full_payload(self) -> Mapping[str, PayloadValue]:
        """Every payload key the signal carries: the shared ones, then its own."""
        if self.shared is None:
            return self.payload
        return {**self.shared.items, **self.payload}

    def to_json(self, app_id: str) -> dict[str, Any]:
        """The signal object exactly as the ingest API expects it."""
        obj: dict[str, Any] = {
            "appID": app_id,
            "clientUser": self.client_user,
            "sessionID": self.session_id,
            "type": self.type,
            "isTestMode": self.test_mode,
            "receivedAt": format_received_at(self.received_at),
            "payload": dict(self.full_payload()),
        }
        if self.float_value is not None:
            obj["floatValue"] = self.float_value
        return obj


#: The fields of a :class:`Signal` but its ``body``, in order: what :func:`encode_fields` encodes.
SignalFields = tuple[
    str, str, str, bool, Mapping[str, PayloadValue], float | None, float, SharedPayload | None
]

#: ``new_signal(Signal, (type, client_user, ..., body))``: builds a Signal from its nine fields
#: in one step, without the generated ``__new__``'s argument handling (the client's hot path).
new_signal: Final = cast(
    Callable[[type[Signal], tuple[Any, Any, Any, Any, Any, Any, Any, Any, Any]], Signal],
    tuple.__new__,
)


#: The reference encoding: compact, no NaN, non-ASCII text as is (``json.dumps`` options).
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _make_object_encoder() -> Callable[[Any], str]:
    """``_ENCODER.encode``, minus the per-call set-up of the C encoder when the stdlib has it.

    ``JSONEncoder.encode`` builds a new C encoder object on every call, which costs more than
    encoding a small payload. This builds it once, with the same options (and no circular
    reference check: payloads are flat, and cannot contain themselves). Where the stdlib has no
    C encoder, or it does not encode a sample exactly like the reference, the reference is used.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    try:
        iterencode = make(None, _ENCODER.default, _json_str, None, ":", ",", False, False, False)

        def encode(obj: Any) -> str:
            return "".join(iterencode(obj, 0))

        sample = {"a": 1, "b": -1.5e300, "c": 'é\n"\u2028\x00', "d": True, "e": False, "": 0}
        if encode(sample) == _ENCODER.encode(sample):
            return encode
    except Exception:  # an interpreter whose C encoder differs: stay on the reference path
        pass
    return _ENCODER.encode


_encode_object: Final = _make_object_encoder()


# floatValue through orjson: Python's float repr (David Gay's shortest round-trip digits) costs
# about 1.5 us for the 16 or 17 digits of a measured duration, orjson's about 0.25 us, and both
# write the same shortest digits. Their formats agree where Python writes plain decimals, from
# 1e-4 up to 1e16 (outside it, Python writes ``1e-05``, orjson ``0.00001`` or ``1e-7``): only
# that range is handed to orjson. Checked once here on the installed release, edges included,
# and by tests/pipeline/test_encoding.py with hypothesis.
_FLOAT_LOW: Final = 1e-4
_FLOAT_HIGH: Final = 1e16


def _orjson_writes_floats_as_repr() -> bool:
    dumps = _orjson_dumps
    if dumps is None:  # pragma: no cover - exercised by the suite run without the extra
        return False
    below_high = math.nextafter(_FLOAT_HIGH, 0.0)
    samples = (_FLOAT_LOW, below_high, 0.1 + 0.2, 2.0**53, 1.5, 12.0, 1234.5678901234567)
    try:
        return all(
            dumps(sign * x) == float.__repr__(sign * x).encode()
            for x in samples
            for sign in (1.0, -1.0)
        )
    except Exception:  # pragma: no cover - a release that refuses floats: the stdlib writes them
        return False


_ORJSON_FLOATS: Final = _orjson_writes_floats_as_repr()


# The encoded start of a signal object, up to the opening quote of receivedAt, by (app ID, user
# hash, session, type, test mode): a service sends the same few combinations again and again, so
# each is written once. Bounded: cleared when full. A dict's get and set are atomic, so the
# rare encode in another thread may share it.
_HEADS: Final[dict[tuple[str, str, str, str, bool], bytes]] = {}
_HEADS_MAX: Final = 4096


def _new_head(key: tuple[str, str, str, str, bool]) -> bytes:
    """Encode and cache ``{"appID":...,"isTestMode":...,"receivedAt":"`` for ``key``.

    ``_json_str`` raises TypeError for a field that is not a str: the caller's reference path
    then encodes or refuses it.
    """
    app_id, client_user, session_id, signal_type, test_mode = key
    head = "".join(
        (
            '{"appID":',
            _json_str(app_id),
            ',"clientUser":',
            _json_str(client_user),
            ',"sessionID":',
            _json_str(session_id),
            ',"type":',
            _json_str(signal_type),
            ',"isTestMode":true,"receivedAt":"'
            if test_mode
            else ',"isTestMode":false,"receivedAt":"',
        )
    ).encode()
    if len(_HEADS) >= _HEADS_MAX:
        _HEADS.clear()
    _HEADS[key] = head
    return head


def encode_signal(signal: Signal, app_id: str) -> bytes:
    """Encode one signal as compact UTF-8 JSON (no NaN, no ASCII escaping of non-ASCII text).

    The result is byte for byte ``json.dumps(signal.to_json(app_id), separators=(",", ":"),
    ensure_ascii=False, allow_nan=False).encode()``: the signal's ``body`` when the client
    encoded it as it built it (for its own app ID), else :func:`encode_fields` of its fields.
    """
    body = signal.body
    if body is not None:
        return body
    return encode_fields(app_id, signal[:8])


def encode_fields(app_id: str, fields: SignalFields, floats: bool | None = None) -> bytes:
    """:func:`encode_signal` of a signal with these ``fields``, without building it first.

    The own payload's members come from :func:`encode_members` (``floats``: whether ``own``
    holds a float, when the caller knows; None to look), the rest from
    :func:`encode_checked`. Anything unusual (a field that is not of its declared type, a
    non-finite floatValue, a value orjson refuses) takes the stdlib or the reference path,
    which also raises the reference errors.
    """
    signal_type, client_user, session_id, test_mode, own, float_value, received_at, shared = fields
    if type(test_mode) is bool and (
        float_value is None or (type(float_value) is float and math.isfinite(float_value))
    ):
        try:
            return encode_checked(
                app_id,
                signal_type,
                client_user,
                session_id,
                test_mode,
                encode_members(own, floats),
                float_value,
                received_at,
                shared,
            )
        except TypeError:  # a field that is not a str: let the reference path encode or refuse it
            pass
    return _ENCODER.encode(Signal(*fields).to_json(app_id)).encode()


def encode_members(own: Mapping[str, PayloadValue], floats: bool | None = None) -> bytes:
    """The JSON members of a checked own payload, closing brace included (b"" for no keys).

    What follows the payload's opening brace (and the shared members) on the wire: a
    :class:`CheckedPayload`'s members as they were encoded when it was made; orjson's when
    the ``fast`` extra is installed and the payload holds no float (orjson writes ``1e-7``
    where the stdlib writes ``1e-07``; ``floats``: whether it does, when the caller knows,
    None to look); else the stdlib's.
    """
    if type(own) is CheckedPayload:  # checked and encoded when it was made
        return own.members
    if not own:
        return b""
    dumps = _orjson_dumps
    if dumps is not None and not (float in map(type, own.values()) if floats is None else floats):
        try:
            return dumps(own)[1:]
        except TypeError:  # a value orjson refuses: the stdlib encodes or refuses it
            pass
    return _encode_object(own)[1:].encode()


def plain_members(payload: Mapping[str, object]) -> bytes | None:
    """:func:`encode_members` of a caller's payload that needs no normalising, else None.

    The client's shortcut for the common payload: a dict of keys already found valid, whose
    values are all str, int or bool, is its own normalised form, so it is encoded as it is
    (orjson, the ``fast`` extra) instead of copied by :func:`normalize_flagged` first. The
    checks are set operations that run in C; orjson refuses, as the checks would, an int past
    64 bits and a lone surrogate (and a key of a str subclass, which equals a valid key): any
    of these, any other payload, or no orjson gives None, and the caller takes the full path,
    which normalises the payload or raises the reason.
    """
    dumps = _orjson_dumps
    if (
        dumps is None
        or type(payload) is not dict
        or not _GOOD_KEYS.issuperset(payload)
        or not _PASS_THROUGH.issuperset(map(type, payload.values()))
    ):
        return None
    try:
        return dumps(payload)[1:]
    except TypeError:  # see above: the full path names the value
        return None


def encode_checked(
    app_id: str,
    signal_type: str,
    client_user: str,
    session_id: str,
    test_mode: bool,
    members: bytes,
    float_value: float | None,
    received_at: float,
    shared: SharedPayload | None,
) -> bytes:
    """The wire bytes of a signal whose fields are checked; ``members`` from :func:`encode_members`.

    The fixed fields come from a cache of encoded heads, the time from a cache of the current
    second, the shared payload keys from their one encoding; a floatValue goes through orjson
    where it writes it as the stdlib does (plain decimals, 1e-4 to 1e16). The client calls
    this directly: its checks already hold what :func:`encode_fields` checks (the text fields
    are str, ``test_mode`` a bool, ``float_value`` finite), and it has the members at hand.
    """
    key = (app_id, client_user, session_id, signal_type, test_mode)
    head = _HEADS.get(key) or _new_head(key)
    if members:
        opening = _PAYLOAD_OPENING if shared is None else shared.opening
    else:  # no own keys: the payload closes right after the shared ones
        opening = _PAYLOAD_OPENING + b"}" if shared is None else shared.alone
    if float_value is None:
        tail = b"}"
    elif (
        _ORJSON_FLOATS
        # The range on both sides, positive first (a duration): no call to abs().
        and (_FLOAT_LOW <= float_value < _FLOAT_HIGH or -_FLOAT_HIGH < float_value <= -_FLOAT_LOW)
        and _orjson_dumps is not None
    ):
        tail = b',"floatValue":' + _orjson_dumps(float_value) + b"}"
    else:
        tail = b',"floatValue":' + float.__repr__(float_value).encode() + b"}"
    # format_received_at, inline: the date and time are formatted once per second.
    seconds = int(received_at)
    millis = int((received_at - seconds) * 1000)
    last, _, text = _last_second
    if seconds == last:  # a second of 1 or later (see _last_second): millis is 0 to 999
        return b"".join((head, text, _MILLIS_BYTES[millis], opening, members, tail))
    stamp = format_received_at(received_at).encode()
    return b"".join((head, stamp, opening, members, tail))


def encode_batch(signals: Sequence[Signal], app_id: str) -> bytes:
    """The request body for ``signals``: a JSON array of their :func:`encode_signal` bytes."""
    return b"[" + b",".join([encode_signal(signal, app_id) for signal in signals]) + b"]"


# The date and time part of the last second formatted, as text and as bytes: signals come in
# bursts within a second, and gmtime + strftime cost more than the rest of the formatting. A
# tuple, so that a reader in another thread never sees the second of one pair with the text of
# another. Only seconds from 1 on are kept: a time of 1.0 or later has its milliseconds
# (``int((t - int(t)) * 1000)``, the fraction exact) in 0 to 999, so a hit needs no range check;
# one before it (0.5, or -0.5, which int() also rounds to second 0) is formatted each time.
_last_second: tuple[int, str, bytes] = (1, "1970-01-01T00:00:01", b"1970-01-01T00:00:01")
# ".000Z" to ".999Z": indexing a table is cheaper than formatting the milliseconds each time.
_MILLIS: Final = tuple(f".{millis:03d}Z" for millis in range(1000))
_MILLIS_BYTES: Final = tuple(text.encode() for text in _MILLIS)


def format_received_at(unix_time: float) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z`` suffix, e.g. ``2026-11-26T05:31:18.120Z``."""
    global _last_second
    seconds = int(unix_time)
    millis = int((unix_time - seconds) * 1000)
    cached_second, text, _ = _last_second
    if seconds != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        if seconds >= 1:
            _last_second = (seconds, text, text.encode())
    if 0 <= millis < 1000:
        return text + _MILLIS[millis]
    return f"{text}.{millis:03d}Z"  # before 1970: as the reference formats it


@attrs.define
class UserHasher:
    """Hashes user ids as the official SDKs do: ``sha256_hex(utf8(user_id + salt))``.

    Services see the same few users again and again, so recent hashes are cached; the cache is
    bounded and lives only in memory (the raw id is never logged, written or sent).
    """

    _salt: str = attrs.field(repr=False)
    _max_entries: int = 4096
    #: user id -> hash, filled by calls; the client reads it directly on its hot path.
    cache: dict[str, str] = attrs.field(factory=dict, repr=False)

    def __call__(self, user_id: object) -> str:
        """Return the lowercase hex SHA-256 of ``user_id + salt``."""
        if type(user_id) is not str:
            raise InvalidSignalError("client_user", f"must be a str, got {type(user_id).__name__}")
        cached = self.cache.get(user_id)
        if cached is not None:
            return cached
        if not user_id:
            raise InvalidSignalError("client_user", "must be a non-empty string")
        check_utf8("client_user", user_id)
        digest = hashlib.sha256((user_id + self._salt).encode()).hexdigest()
        if len(self.cache) >= self._max_entries:
            self.cache.clear()  # cheaper than LRU bookkeeping; refills in one pass of traffic
        self.cache[user_id] = digest
        return digest
