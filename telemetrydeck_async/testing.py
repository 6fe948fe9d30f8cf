"""Helpers for testing an application that sends signals: capture them, with no network.

:class:`RecordingClient` is a real :class:`~telemetrydeck_async.TelemetryClient` (validation,
hashing, prefixes, SDK parameters, batching and JSON encoding all run as in production) whose
HTTP edge records each request body instead of posting it. What it records is exactly the list
of signal objects a server would have received::

    import pytest
    from telemetrydeck_async.testing import RecordingClient


    @pytest.fixture
    async def td():
        async with RecordingClient() as client:
            yield client


    async def test_checkout_reports_the_payment(td: RecordingClient) -> None:
        await checkout(td, user="alice", items=3)  # your code, handed the client
        await td.flush()  # signals are recorded when a batch is "sent"
        td.assert_signal_sent("Checkout.Payment.completed", {"Cart.items": 3}, float_value=19.99)

Assertions compare with the wire: signal types and payload keys as sent (after any
``signal_prefix``/``payload_prefix``), payloads as a subset (the SDK parameters every signal
carries need not be listed), ``client_user`` as the raw id (hashed with the client's salt for
you), floats with a relative tolerance of 1e-9. ``unittest.mock.ANY`` matches any value that
is present.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from ._client import TelemetryClient
from ._config import ClientConfig
from ._transport import Transport

__all__ = [
    "RecordingClient",
    "RecordingTransport",
    "assert_no_signal_sent",
    "assert_signal_sent",
]


class _Anything:
    """The default of the optional matchers: "not checked"."""

    def __repr__(self) -> str:
        return "<not checked>"


_UNCHECKED: Final[Any] = _Anything()
_MISSING: Final = object()


@attrs.define
class RecordingTransport(Transport):
    """A transport that keeps every request body it is given and never touches the network.

    Each call of ``send`` succeeds at once (like a server answering 200). ``requests`` holds
    the decoded bodies (one list of signal objects per request), ``signals`` all signal
    objects in the order they were sent.
    """

    requests: list[list[dict[str, Any]]] = attrs.field(factory=list)
    signals: list[dict[str, Any]] = attrs.field(factory=list)

    async def send(self, body: bytes) -> None:
        """Record one JSON-array request body."""
        batch: list[dict[str, Any]] = json.loads(body)
        self.requests.append(batch)
        self.signals.extend(batch)

    async def close(self) -> None:
        """Nothing to close: there is no connection."""

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self.requests.clear()
        self.signals.clear()


class RecordingClient(TelemetryClient):
    """A :class:`~telemetrydeck_async.TelemetryClient` that records signals instead of sending.

    Accepts every option of ``TelemetryClient``; ``app_id`` defaults to ``"test-app"`` and
    ``default_user`` to ``"test-user"`` (pass ``default_user=None`` together with
    ``default_user_file=`` to exercise the persisted default user). Call ``await flush()``
    before asserting: like the real client, signals leave the queue in batches.
    """

    _recorder: RecordingTransport

    def __init__(self, app_id: str = "test-app", **options: Any) -> None:
        options.setdefault("default_user", "test-user")
        super().__init__(app_id, **options)

    def _make_transport(self, config: ClientConfig) -> Transport:
        self._recorder = RecordingTransport(config.endpoint_url, config.request_timeout)
        return self._recorder

    async def __aenter__(self) -> RecordingClient:
        await super().__aenter__()
        return self

    @property
    def transport(self) -> RecordingTransport:
        """The recording transport (its ``requests`` are the request bodies, decoded)."""
        return self._recorder

    @property
    def signals(self) -> list[dict[str, Any]]:
        """Every signal object sent so far, exactly as a server would have received it."""
        return self._recorder.signals

    def signals_of(self, signal_type: str) -> list[dict[str, Any]]:
        """The recorded signals of one type (as sent, prefix included), oldest first."""
        return [s for s in self._recorder.signals if s.get("type") == signal_type]

    def clear(self) -> None:
        """Forget every signal recorded so far (signals still queued are kept)."""
        self._recorder.clear()

    def assert_signal_sent(
        self,
        signal_type: str,
        payload: Mapping[str, Any] | None = None,
        /,
        *,
        count: int | None = None,
        client_user: str = _UNCHECKED,
        session_id: str = _UNCHECKED,
        float_value: float | None = _UNCHECKED,
        test_mode: bool = _UNCHECKED,
        **payload_items: Any,
    ) -> dict[str, Any]:
        """Assert a signal of ``signal_type`` was sent; return the first one that matches.

        See :func:`assert_signal_sent` for the matching rules.
        """
        return assert_signal_sent(
            self,
            signal_type,
            payload,
            count=count,
            client_user=client_user,
            session_id=session_id,
            float_value=float_value,
            test_mode=test_mode,
            **payload_items,
        )

    def assert_no_signal_sent(self, signal_type: str | None = None) -> None:
        """Assert no signal (of ``signal_type``, when given) was sent."""
        assert_no_signal_sent(self, signal_type)


def _signals_and_salt(
    recorded: RecordingClient | Iterable[Mapping[str, Any]],
) -> tuple[list[Mapping[str, Any]], str, int]:
    if isinstance(recorded, RecordingClient):
        return list(recorded.signals), recorded.config.salt, recorded.stats.queue_depth
    return list(recorded), "", 0


def _same(expected: object, actual: object) -> bool:
    # JSON keeps true apart from 1; so do we (Python alone would say True == 1).
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(expected, bool) and isinstance(actual, bool) and expected == actual
    # Amounts are usually computed (10.0 + 9.99 is 19.990000000000002): compare floats with a
    # tiny relative tolerance instead of failing on the last binary digit.
    if (
        isinstance(expected, (int, float))
        and isinstance(actual, (int, float))
        and (isinstance(expected, float) or isinstance(actual, float))
    ):
        return math.isclose(expected, actual, rel_tol=1e-9, abs_tol=1e-12)
    return expected == actual


def _differences(signal: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """How ``signal`` differs from what was expected, one phrase per difference."""
    found: list[str] = []
    payload = signal.get("payload") or {}
    for key, want in expected.items():
        if key.startswith("payload:"):
            name = key[len("payload:") :]
            have = payload.get(name, _MISSING)
            if have is _MISSING:
                found.append(f"payload has no {name!r}")
            elif not _same(want, have):
                found.append(f"payload[{name!r}] is {have!r}, expected {want!r}")
        else:
            have = signal.get(key, _MISSING)
            if want is None and have is _MISSING:
                continue  # float_value=None: "no floatValue"
            if have is _MISSING:
                found.append(f"{key} is missing, expected {want!r}")
            elif not _same(want, have):
                found.append(f"{key} is {have!r}, expected {want!r}")
    return found


def assert_signal_sent(
    recorded: RecordingClient | Iterable[Mapping[str, Any]],
    signal_type: str,
    payload: Mapping[str, Any] | None = None,
    /,
    *,
    count: int | None = None,
    client_user: str = _UNCHECKED,
    session_id: str = _UNCHECKED,
    float_value: float | None = _UNCHECKED,
    test_mode: bool = _UNCHECKED,
    **payload_items: Any,
) -> dict[str, Any]:
    """Assert that a signal matching the description was sent; return the first match.

    Args:
        recorded: a :class:`RecordingClient`, or any list of signal objects (for example
            ``IngestEmulator.signals``).
        signal_type: the type exactly as sent (after ``signal_prefix``).
        payload: keys that must be in the payload with these values (others may be there too;
            ``unittest.mock.ANY`` accepts any value). Keys that are Python identifiers can
            also be given as keyword arguments: ``assert_signal_sent(td, "A.b", plan="pro")``.
        count: when given, exactly this many signals must match.
        client_user: the raw user id; compared with ``clientUser`` after hashing it with the
            client's salt (with the empty salt when ``recorded`` is a plain list).
        session_id: compared with ``sessionID``.
        test_mode: compared with ``isTestMode``.
        float_value: compared with ``floatValue``; ``None`` means "no floatValue".
            Numbers that are floats compare with a relative tolerance of 1e-9.

    Raises:
        AssertionError: with what was expected, how each signal of that type differs, which
            types were sent, and a hint when signals are still queued (call ``flush()``).
    """
    signals, salt, queued = _signals_and_salt(recorded)
    expected: dict[str, Any] = {}
    for key, value in {**(payload or {}), **payload_items}.items():
        expected[f"payload:{key}"] = value
    if client_user is not _UNCHECKED:
        expected["clientUser"] = hashlib.sha256((client_user + salt).encode()).hexdigest()
    if session_id is not _UNCHECKED:
        expected["sessionID"] = session_id
    if float_value is not _UNCHECKED:
        expected["floatValue"] = float_value
    if test_mode is not _UNCHECKED:
        expected["isTestMode"] = test_mode

    of_type = [s for s in signals if s.get("type") == signal_type]
    diffs = [_differences(s, expected) for s in of_type]
    matches = [s for s, d in zip(of_type, diffs, strict=True) if not d]
    if matches and (count is None or len(matches) == count):
        return dict(matches[0])

    wanted = _describe(signal_type, expected, client_user)
    if matches:  # count given and not met
        lines = [f"expected {count} signal(s) matching {wanted}, found {len(matches)}"]
    else:
        lines = [f"no signal matched {wanted}"]
    if of_type:
        lines.append(f"{len(of_type)} signal(s) of type {signal_type!r} were sent:")
        shown = 10
        for index, diff in enumerate(diffs[:shown]):
            lines.append(f"  [{index}] " + ("matches" if not diff else "; ".join(diff)))
        if len(of_type) > shown:
            lines.append(f"  ... and {len(of_type) - shown} more")
    lines.append("types sent: " + _type_summary(signals))
    if queued:
        lines.append(
            f"{queued} signal(s) are still queued and not recorded yet: "
            "await client.flush() before asserting"
        )
    raise AssertionError("\n".join(lines))


def assert_no_signal_sent(
    recorded: RecordingClient | Iterable[Mapping[str, Any]], signal_type: str | None = None
) -> None:
    """Assert that no signal was sent at all, or none of ``signal_type`` when given."""
    signals, _salt, queued = _signals_and_salt(recorded)
    hits = [s for s in signals if signal_type is None or s.get("type") == signal_type]
    if hits:
        what = "signals" if signal_type is None else f"signals of type {signal_type!r}"
        raise AssertionError(
            f"expected no {what}, but {len(hits)} were sent; types sent: {_type_summary(signals)}"
        )
    if queued:
        # Not recorded yet is not "not sent": say so instead of passing by accident.
        raise AssertionError(
            f"{queued} signal(s) are still queued and not recorded yet: "
            "await client.flush() before asserting that nothing was sent"
        )


def _describe(signal_type: str, expected: Mapping[str, Any], client_user: object) -> str:
    parts = [f"type {signal_type!r}"]
    payload = {k[len("payload:") :]: v for k, v in expected.items() if k.startswith("payload:")}
    if payload:
        parts.append(f"payload containing {payload!r}")
    for key, value in expected.items():
        if key.startswith("payload:"):
            continue
        if key == "clientUser":
            parts.append(f"client_user {client_user!r} (hashed)")
        else:
            parts.append(f"{key}={value!r}")
    return ", ".join(parts)


def _type_summary(signals: Iterable[Mapping[str, Any]]) -> str:
    counts = Counter(str(s.get("type")) for s in signals)
    if not counts:
        return "none"
    return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items()))
