"""A local emulator of TelemetryDeck's Ingest API v2, with scriptable faults.

It speaks the wire contract of ``SPEC.md`` on loopback and checks every signal the way the
contract describes, so an SDK bug (a raw user id, a nested payload, a missing field) shows up
as a ``400`` naming the signal and the field instead of silently passing a mock.

Three ways to use it:

* in tests, in-process, on ``127.0.0.1`` port 0 (see the example below);
* from a shell: ``python -m telemetrydeck_async devserver --port 8787 --fail-fraction 0.2``
  (see :func:`run_devserver`, :func:`add_devserver_arguments`, :func:`devserver_main`);
* in another process on a fixed port, started and stopped again to simulate an outage.

In a test::

    async with IngestEmulator(faults=FaultPlan(fail_next=2, retry_after="1")) as emu:
        client = TelemetryClient(app_id=..., base_url=emu.base_url)
        ...
        assert await emu.wait_for_signals(10)
        emu.faults.reset_next = 1          # the live plan can be changed at any time

Routes:

* ``POST /v2/namespace/{namespace}/``: ingest (the namespace must match ``[A-Za-z0-9._-]+``)
* ``POST /v2/``: ingest, the older URL without a namespace
* ``GET /signals``: every accepted signal, as a JSON list
* ``GET /stats``: counters: signals, batches, requests, distinct, ...
* ``POST /_faults``: update the live :class:`FaultPlan` from a JSON object
* ``POST /_reset``: forget everything recorded (not the fault plan)

Faults apply to the ingest routes only, so the control routes keep working while the
emulator plays a broken server. It binds loopback addresses only: it is a development tool.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import math
import random
import re
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

import attrs
from aiohttp import web

__all__ = [
    "EMULATOR_KEY",
    "FaultPlan",
    "IngestEmulator",
    "RequestRecord",
    "add_devserver_arguments",
    "build_app",
    "devserver_main",
    "run_devserver",
]

logger = logging.getLogger("telemetrydeck_async.devserver")

#: A payload value as the contract allows it: a flat primitive.
PayloadValue = str | int | float | bool

#: Bodies above this size are refused with 413 whatever the fault plan says, so a runaway
#: client cannot make the emulator buffer gigabytes.
HARD_BODY_LIMIT = 16 * 1024 * 1024

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9._-]+")
_CLIENT_USER_RE = re.compile(r"[0-9a-f]{64}")
_REQUIRED_FIELDS = ("appID", "clientUser", "type")
_OPTIONAL_FIELDS = ("sessionID", "isTestMode", "floatValue", "payload", "receivedAt")
_KNOWN_FIELDS = frozenset(_REQUIRED_FIELDS + _OPTIONAL_FIELDS)
_READ_CHUNK = 64 * 1024


# --------------------------------------------------------------------------- fault plan


def _non_negative_int(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def _optional_non_negative_int(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if value is not None:
        _non_negative_int(instance, attribute, value)


def _http_status(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 200 <= value <= 599:
        raise ValueError(f"{attribute.name} must be an HTTP status in 200..599, got {value!r}")


def _optional_http_status(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _http_status(instance, attribute, value)


def _number_in(low: float, high: float) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            raise ValueError(f"{attribute.name} must be a number in [{low}, {high}], got {value!r}")

    return check


def _optional_header_text(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    # A CR or LF would let the value break out of its header line.
    if not isinstance(value, str) or not value or "\r" in value or "\n" in value:
        raise ValueError(f"{attribute.name} must be a non-empty one-line string, got {value!r}")


def _int(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be an integer, got {value!r}")


@attrs.define(kw_only=True)
class FaultPlan:
    """What the emulator should do wrong, changeable while it runs.

    Every field defaults to "no fault". The object is mutable and validated on every
    assignment (a bad value raises :class:`ValueError`), so a test can write
    ``emu.faults.fail_next = 3`` halfway through. Counters (``*_next``) are decremented as the
    fault fires.

    Faults are checked in this order and the first one that fires decides the answer
    (a counter is only spent when its fault fires): ``delay`` (always applies) →
    ``stall_next`` → ``reset_next`` → ``status_always`` → ``fail_next`` → ``fail_fraction`` →
    content checks (415, ``max_body_bytes`` 413, invalid JSON/signals 400, ``reject_marker`` 400) →
    ``drop_after_accept_next`` → 200.
    """

    #: The next K ingest requests are answered with :attr:`fail_status`.
    fail_next: int = attrs.field(default=0, validator=_non_negative_int)
    #: The status used by ``fail_next`` and ``fail_fraction`` (default 503).
    fail_status: int = attrs.field(default=503, validator=_http_status)
    #: This fraction of requests (drawn from a ``random.Random(seed)``) gets ``fail_status``.
    fail_fraction: float = attrs.field(default=0.0, validator=_number_in(0.0, 1.0))
    #: ``Retry-After`` header value sent with every injected failure status (``fail_next``,
    #: ``fail_fraction``, ``status_always``), e.g. ``"2"`` or an HTTP-date.
    retry_after: str | None = attrs.field(default=None, validator=_optional_header_text)
    #: Seconds to wait before handling every ingest request.
    delay: float = attrs.field(default=0.0, validator=_number_in(0.0, 3600.0))
    #: The next K requests are held ``stall_seconds`` without an answer, then the connection is
    #: reset and nothing is recorded: a server that never answers (the client times out).
    stall_next: int = attrs.field(default=0, validator=_non_negative_int)
    #: How long ``stall_next`` holds a request.
    stall_seconds: float = attrs.field(default=30.0, validator=_number_in(0.0, 3600.0))
    #: The next K requests: the connection is reset before the body is read; nothing recorded.
    reset_next: int = attrs.field(default=0, validator=_non_negative_int)
    #: The next K valid requests: the signals are recorded, then the connection is dropped
    #: without an answer, which is the case at-least-once delivery has to live with.
    drop_after_accept_next: int = attrs.field(default=0, validator=_non_negative_int)
    #: Bodies larger than this many bytes get 413 (nothing recorded).
    max_body_bytes: int | None = attrs.field(default=None, validator=_optional_non_negative_int)
    #: Any signal whose payload has this key gets its whole request refused with 400.
    reject_marker: str | None = attrs.field(default=None, validator=_optional_header_text)
    #: Answer every ingest request with this status (e.g. 401 for a wrong app ID).
    status_always: int | None = attrs.field(default=None, validator=_optional_http_status)
    #: Seed of the random generator behind ``fail_fraction``.
    seed: int = attrs.field(default=0, validator=_int)

    def to_json(self) -> dict[str, Any]:
        """Return the plan as a JSON-ready dict (field name → value)."""
        return attrs.asdict(self)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` (field name → value) all at once, or none of them.

        Raises :class:`ValueError` for an unknown field or an invalid value; the plan is
        untouched in that case.
        """
        names = {a.name for a in attrs.fields(FaultPlan)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(unknown)}")
        # evolve() runs every validator on a copy first, so a bad value changes nothing.
        checked = attrs.evolve(self, **changes)
        for name in changes:
            setattr(self, name, getattr(checked, name))

    def describe(self) -> str:
        """Return the active faults as ``name=value`` pairs (``"none"`` if there are none)."""
        default = FaultPlan()
        active = [
            f"{a.name}={getattr(self, a.name)!r}"
            for a in attrs.fields(FaultPlan)
            if getattr(self, a.name) != getattr(default, a.name)
        ]
        return " ".join(active) if active else "none"


# --------------------------------------------------------------------------- records


@attrs.frozen
class RequestRecord:
    """One ingest request that reached the emulator's handler, whatever its fate."""

    #: ``time.monotonic()`` when the request arrived (before any ``delay``).
    time: float
    #: The request path, e.g. ``/v2/namespace/com.example/``.
    path: str
    #: The status answered, or ``None`` when the connection was reset or dropped.
    status: int | None
    #: Number of elements in the body's JSON array (0 if the body was not read or parsed).
    n_signals: int
    #: Number of body bytes read (0 if the body was not read).
    body_bytes: int
    #: The request headers (the last value wins for a repeated header).
    headers: dict[str, str] = attrs.field(factory=dict, hash=False)
    #: The fault that decided the answer (a :class:`FaultPlan` field name), or ``None``.
    fault: str | None = None


@attrs.frozen
class _Problem:
    """Why one signal was refused."""

    signal: int
    field: str | None
    error: str
    key: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"signal": self.signal, "field": self.field, "error": self.error}
        if self.key is not None:
            out["key"] = self.key
        return out


@attrs.frozen
class _Outcome:
    """How one ingest request ends; the handler records and answers from it."""

    status: int | None
    body: dict[str, Any] | None = None
    n_signals: int = 0
    body_bytes: int = 0
    fault: str | None = None
    abort: Literal["reset", "drop"] | None = None
    retry_after: str | None = None
    accepted: list[dict[str, Any]] | None = None


# --------------------------------------------------------------------------- validation


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    if not _is_number(value):
        return False
    # Python's json turns 1e999 into inf and accepts the non-standard NaN/Infinity tokens.
    return not isinstance(value, float) or math.isfinite(value)


def _parses_as_iso8601(text: str) -> bool:
    # datetime.fromisoformat() only understands a trailing "Z" from Python 3.11 on.
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _check_signal(index: int, obj: object) -> _Problem | None:
    """Return the first problem of one signal, or ``None`` if it follows the contract.

    Messages name fields and expectations, never the values: a refused ``clientUser`` may
    be a raw user id, and that must not end up in a log.
    """
    if not isinstance(obj, dict):
        return _Problem(index, None, "each signal must be a JSON object")
    unknown = sorted(set(obj) - _KNOWN_FIELDS)
    if unknown:
        return _Problem(
            index, unknown[0], f"unknown field {unknown[0]!r}; allowed: {sorted(_KNOWN_FIELDS)}"
        )
    for name in _REQUIRED_FIELDS:
        if name not in obj:
            return _Problem(index, name, f"{name} is required")
    if not isinstance(obj["appID"], str) or not obj["appID"]:
        return _Problem(index, "appID", "appID must be a non-empty string")
    user = obj["clientUser"]
    if not isinstance(user, str) or not _CLIENT_USER_RE.fullmatch(user):
        return _Problem(
            index,
            "clientUser",
            "clientUser must be the SHA-256 hash of the user id as 64 lowercase hex "
            "characters; hash the id in the client, never send it raw",
        )
    if not isinstance(obj["type"], str) or not obj["type"]:
        return _Problem(index, "type", "type must be a non-empty string")
    if "sessionID" in obj and not isinstance(obj["sessionID"], str):
        return _Problem(index, "sessionID", "sessionID must be a string")
    if "isTestMode" in obj and not isinstance(obj["isTestMode"], bool):
        return _Problem(index, "isTestMode", "isTestMode must be a JSON boolean")
    if "floatValue" in obj and not _is_finite_number(obj["floatValue"]):
        return _Problem(index, "floatValue", "floatValue must be a finite number")
    if "payload" in obj:
        payload = obj["payload"]
        if not isinstance(payload, dict):
            return _Problem(index, "payload", "payload must be a JSON object")
        for key, value in payload.items():
            if isinstance(value, bool | str) or _is_finite_number(value):
                continue
            return _Problem(
                index,
                "payload",
                f"payload value for key {key!r} must be a string, finite number or boolean "
                "(no objects, arrays or null)",
                key=key,
            )
    if "receivedAt" in obj and not (
        isinstance(obj["receivedAt"], str) and _parses_as_iso8601(obj["receivedAt"])
    ):
        return _Problem(index, "receivedAt", "receivedAt must be an ISO-8601 time string")
    return None


def _rejection(problems: list[_Problem]) -> dict[str, Any]:
    """Build the 400 body: the first problem at the top level, all of them in ``errors``."""
    first = problems[0]
    return {
        "error": f"signal {first.signal}: {first.error}",
        "signal": first.signal,
        "field": first.field,
        **({"key": first.key} if first.key is not None else {}),
        "errors": [p.to_json() for p in problems],
    }


# --------------------------------------------------------------------------- emulator


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"the ingest emulator only binds loopback addresses (127.0.0.1, ::1, localhost), "
            f"not {host!r}: it is a development tool"
        )


def _check_host(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    _check_loopback(value)


def _abort(request: web.BaseRequest, *, reset: bool) -> None:
    """Close the client's connection without an answer; with ``reset``, send a TCP RST."""
    transport = request.transport
    if transport is None:  # the client already went away
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@attrs.define(kw_only=True, eq=False)
class IngestEmulator:
    """An in-process TelemetryDeck ingest server that records what it accepts.

    Use it as an async context manager (or :meth:`start` / :meth:`stop`). ``port=0`` picks a
    free port; read the real one from :attr:`port` or :attr:`base_url` once started.
    A fixed port can be stopped and started again (the socket uses ``SO_REUSEADDR``) to
    simulate an outage. ``id_key`` names the payload key that tags each signal with a unique
    id, for :meth:`distinct_ids` and :meth:`duplicates`. ``echo=True`` prints one line per
    ingest request to stdout. ``shutdown_timeout`` is how long :meth:`stop` lets in-flight
    requests finish before cutting them off.
    """

    _host: str = attrs.field(default="127.0.0.1", validator=_check_host)
    _port: int = attrs.field(default=0, validator=_non_negative_int)
    #: The live fault plan; change its fields at any time.
    faults: FaultPlan = attrs.field(factory=FaultPlan)
    #: Payload key holding a per-signal unique id.
    id_key: str = "Test.id"
    #: Print one line per ingest request to stdout.
    echo: bool = False
    shutdown_timeout: float = 0.5
    #: Serve HTTPS with this server context (None: plain HTTP).
    ssl_context: ssl.SSLContext | None = None

    #: Every accepted signal, in arrival order (duplicates included).
    signals: list[dict[str, Any]] = attrs.field(init=False, factory=list)
    #: Every accepted request body.
    batches: list[list[dict[str, Any]]] = attrs.field(init=False, factory=list)
    #: The namespace of each accepted batch (``None`` for ``POST /v2/``), parallel to batches.
    namespaces: list[str | None] = attrs.field(init=False, factory=list)
    #: Every ingest request that reached the handler, including refused and faulted ones.
    requests: list[RequestRecord] = attrs.field(init=False, factory=list)

    _runner: web.AppRunner | None = attrs.field(init=False, default=None)
    _bound_port: int | None = attrs.field(init=False, default=None)
    # (n, future) pairs of wait_for_signals() callers; plain futures rather than an
    # asyncio.Condition so the emulator is not tied to the loop that first used it.
    _waiters: list[tuple[int, asyncio.Future[None]]] = attrs.field(init=False, factory=list)
    _rng: random.Random = attrs.field(init=False, factory=random.Random)
    _rng_seed: int | None = attrs.field(init=False, default=None)

    # ------------------------------------------------------------------ lifecycle

    @property
    def host(self) -> str:
        """The address the emulator binds."""
        return self._host

    @property
    def port(self) -> int:
        """The port actually bound once started (the requested one before that)."""
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (``https://`` with ``ssl_context``) to hand to a client."""
        if self.port == 0:
            raise RuntimeError("the emulator picks its port on start(); start it first")
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the emulator is serving."""
        return self._runner is not None

    async def start(self) -> None:
        """Bind the socket and start serving. Raises :class:`OSError` if the port is taken."""
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        runner = web.AppRunner(
            build_app(self), access_log=None, shutdown_timeout=self.shutdown_timeout
        )
        await runner.setup()
        try:
            site = web.TCPSite(
                runner,
                self._host,
                self._port,
                reuse_address=True,
                ssl_context=self.ssl_context,
            )
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound_port = runner.addresses[0][1]
        logger.debug("ingest emulator listening on %s", self.base_url)

    async def stop(self) -> None:
        """Stop serving and release the port; in-flight requests get ``shutdown_timeout``."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await runner.cleanup()
        logger.debug("ingest emulator on port %d stopped", self.port)
        self._bound_port = None

    async def __aenter__(self) -> IngestEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ queries

    def _ids(self) -> list[PayloadValue]:
        ids: list[PayloadValue] = []
        for sig in self.signals:
            payload = sig.get("payload")
            if isinstance(payload, dict) and self.id_key in payload:
                ids.append(payload[self.id_key])
        return ids

    def distinct_ids(self) -> set[PayloadValue]:
        """Return the set of ``payload[id_key]`` values among accepted signals."""
        return set(self._ids())

    def duplicates(self) -> int:
        """Return how many accepted signals carried a ``payload[id_key]`` already seen."""
        ids = self._ids()
        return len(ids) - len(set(ids))

    def count_by_type(self) -> dict[str, int]:
        """Return the number of accepted signals per signal type."""
        return dict(collections.Counter(str(sig["type"]) for sig in self.signals))

    def stats(self) -> dict[str, Any]:
        """Return the counters served on ``GET /stats``."""
        return {
            "signals": len(self.signals),
            "batches": len(self.batches),
            "requests": len(self.requests),
            "distinct": len(self.distinct_ids()),
            "duplicates": self.duplicates(),
            "by_type": self.count_by_type(),
        }

    def reset(self) -> None:
        """Forget every recorded signal, batch and request; the fault plan is kept."""
        self.signals.clear()
        self.batches.clear()
        self.namespaces.clear()
        self.requests.clear()

    async def wait_for_signals(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``n`` signals were accepted; ``False`` after ``timeout`` s."""
        if len(self.signals) >= n:
            return True
        waiter = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter[1], timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            self._waiters.remove(waiter)
        return True

    # ------------------------------------------------------------------ ingest

    def _roll(self, plan: FaultPlan) -> float:
        if self._rng_seed != plan.seed:  # reseed whenever the plan's seed changes
            self._rng.seed(plan.seed)
            self._rng_seed = plan.seed
        return self._rng.random()

    async def _handle_ingest(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        namespace = request.match_info.get("namespace")
        outcome = await self._process(request, namespace)
        self.requests.append(
            RequestRecord(
                time=arrived,
                path=request.path,
                status=outcome.status,
                n_signals=outcome.n_signals,
                body_bytes=outcome.body_bytes,
                headers=dict(request.headers),
                fault=outcome.fault,
            )
        )
        if self.echo:
            self._echo(namespace, outcome)
        if outcome.abort is not None:
            _abort(request, reset=outcome.abort == "reset")
            # aiohttp fails to write this to the closed transport and drops it quietly
            # (a ConnectionError during finish_response is treated as a client disconnect).
            return web.Response(status=499)
        headers = {"Retry-After": outcome.retry_after} if outcome.retry_after else None
        assert outcome.status is not None
        return web.json_response(outcome.body, status=outcome.status, headers=headers)

    async def _process(self, request: web.Request, namespace: str | None) -> _Outcome:
        plan = self.faults
        if plan.delay > 0:
            await asyncio.sleep(plan.delay)
        if namespace is not None and not _NAMESPACE_RE.fullmatch(namespace):
            return _Outcome(404, {"error": "namespace must match [A-Za-z0-9._-]+"})

        if plan.stall_next > 0:
            plan.stall_next -= 1
            await asyncio.sleep(plan.stall_seconds)
            return _Outcome(None, fault="stall_next", abort="reset")
        if plan.reset_next > 0:
            plan.reset_next -= 1
            return _Outcome(None, fault="reset_next", abort="reset")
        injected: str | None = None
        status = plan.fail_status
        if plan.status_always is not None:
            injected, status = "status_always", plan.status_always
        elif plan.fail_next > 0:
            plan.fail_next -= 1
            injected = "fail_next"
        elif plan.fail_fraction > 0 and self._roll(plan) < plan.fail_fraction:
            injected = "fail_fraction"
        if injected is not None:
            return _Outcome(
                status,
                {"error": f"injected failure ({injected})"},
                fault=injected,
                retry_after=plan.retry_after,
            )

        if request.content_type != "application/json":
            return _Outcome(415, {"error": "Content-Type must be application/json"})
        limit, fault = HARD_BODY_LIMIT, None
        if plan.max_body_bytes is not None and plan.max_body_bytes < HARD_BODY_LIMIT:
            limit, fault = plan.max_body_bytes, "max_body_bytes"
        body, size = await _read_capped(request, limit)
        if body is None:
            return _Outcome(
                413,
                {"error": f"body larger than {limit} bytes; split the batch"},
                body_bytes=size,
                fault=fault,
            )

        try:
            batch = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return _Outcome(400, {"error": f"body is not valid UTF-8 JSON: {exc}"}, body_bytes=size)
        if not isinstance(batch, list):
            return _Outcome(
                400, {"error": "body must be a JSON array of signal objects"}, body_bytes=size
            )
        n = len(batch)
        problems = [p for i, obj in enumerate(batch) if (p := _check_signal(i, obj)) is not None]
        if problems:
            return _Outcome(400, _rejection(problems), n_signals=n, body_bytes=size)
        marker = plan.reject_marker
        if marker is not None:
            marked = [
                _Problem(i, "payload", f"payload has the reject marker key {marker!r}", key=marker)
                for i, sig in enumerate(batch)
                if marker in sig.get("payload", {})
            ]
            if marked:
                return _Outcome(
                    400, _rejection(marked), n_signals=n, body_bytes=size, fault="reject_marker"
                )

        self._record(batch, namespace)
        if plan.drop_after_accept_next > 0:
            plan.drop_after_accept_next -= 1
            return _Outcome(
                None,
                n_signals=n,
                body_bytes=size,
                fault="drop_after_accept_next",
                abort="drop",
                accepted=batch,
            )
        return _Outcome(200, {"accepted": n}, n_signals=n, body_bytes=size, accepted=batch)

    def _record(self, batch: list[dict[str, Any]], namespace: str | None) -> None:
        self.batches.append(batch)
        self.namespaces.append(namespace)
        self.signals.extend(batch)
        for n, future in self._waiters:
            if len(self.signals) >= n and not future.done():
                future.set_result(None)

    def _echo(self, namespace: str | None, outcome: _Outcome) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        if namespace is None:
            ns = "-"
        elif _NAMESPACE_RE.fullmatch(namespace):
            ns = namespace
        else:  # a refused namespace may hold anything; json.dumps keeps it on one line
            ns = json.dumps(namespace)
        status = "---" if outcome.status is None else str(outcome.status)
        if outcome.abort == "reset":
            what = "connection reset before reading (reset_next)"
        elif outcome.accepted is not None:
            batch = outcome.accepted
            types = collections.Counter(str(s["type"]) for s in batch)
            # json.dumps keeps odd type names (spaces, newlines) on one line.
            what = f"{len(batch)} signals {json.dumps(dict(types.most_common()))}"
            if outcome.abort == "drop":
                what += " recorded, then connection dropped (drop_after_accept_next)"
        else:
            error = (outcome.body or {}).get("error", "")
            what = f"refused {json.dumps(error)}"
        print(f"{stamp} {status} ns={ns} {what}", flush=True)

    # ------------------------------------------------------------------ control routes

    async def _handle_signals(self, request: web.Request) -> web.Response:
        return web.json_response(self.signals)

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle_faults(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
        except ValueError as exc:
            return web.json_response({"error": f"body is not valid JSON: {exc}"}, status=400)
        if not isinstance(changes, dict):
            return web.json_response(
                {"error": "body must be a JSON object of FaultPlan fields"}, status=400
            )
        try:
            self.faults.update(changes)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        logger.debug("fault plan is now: %s", self.faults.describe())
        return web.json_response(self.faults.to_json())

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})


async def _read_capped(request: web.Request, limit: int) -> tuple[bytes | None, int]:
    """Read the body, giving up (``None``) as soon as it exceeds ``limit`` bytes."""
    declared = request.content_length
    if declared is not None and declared > limit:
        return None, 0
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            return None, size
        chunks.append(chunk)
    return b"".join(chunks), size


#: Where :func:`build_app` keeps the emulator serving the app: ``app[EMULATOR_KEY]``.
EMULATOR_KEY: web.AppKey[IngestEmulator] = web.AppKey("telemetrydeck_emulator", IngestEmulator)


def build_app(emulator: IngestEmulator | None = None) -> web.Application:
    """Return the aiohttp application serving ``emulator`` (a new default one if ``None``).

    Useful to mount the emulator in an existing aiohttp test setup; the emulator is
    available as ``app[EMULATOR_KEY]``. :class:`IngestEmulator` calls this itself.
    """
    emu = emulator if emulator is not None else IngestEmulator()
    app = web.Application(client_max_size=HARD_BODY_LIMIT)
    app[EMULATOR_KEY] = emu
    app.router.add_post("/v2/namespace/{namespace}/", emu._handle_ingest)
    app.router.add_post("/v2/", emu._handle_ingest)
    app.router.add_get("/signals", emu._handle_signals)
    app.router.add_get("/stats", emu._handle_stats)
    app.router.add_post("/_faults", emu._handle_faults)
    app.router.add_post("/_reset", emu._handle_reset)
    return app


# --------------------------------------------------------------------------- command line


def run_devserver(
    host: str = "127.0.0.1", port: int = 8787, faults: FaultPlan | None = None
) -> None:
    """Run the emulator with ``echo`` on until SIGINT or SIGTERM (blocking).

    The first line printed is ``telemetrydeck-async ingest emulator listening on URL``
    (with the real port when ``port=0``). Raises :class:`ValueError` for a non-loopback
    host and :class:`OSError` if the port cannot be bound.
    """
    _check_loopback(host)
    with contextlib.suppress(KeyboardInterrupt):  # where signal handlers are unavailable
        asyncio.run(_serve(host, port, faults if faults is not None else FaultPlan()))


async def _serve(host: str, port: int, faults: FaultPlan) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not available on Windows or outside the main thread; Ctrl-C still works there.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    async with IngestEmulator(host=host, port=port, faults=faults, echo=True) as emu:
        print(f"telemetrydeck-async ingest emulator listening on {emu.base_url}", flush=True)
        print(f"faults: {faults.describe()}", flush=True)
        await stop.wait()


def add_devserver_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--host``, ``--port`` and one flag per :class:`FaultPlan` field to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=8787, help="port (0: any free port)")
    faults = parser.add_argument_group(
        "faults",
        "Injected failures, to watch a client retry, back off, split or keep signals. "
        "Counters (*-next) are spent as they fire; POST /_faults changes them while running.",
    )
    add = faults.add_argument
    add(
        "--fail-next",
        type=int,
        default=0,
        metavar="K",
        help="answer the next K requests with --fail-status (retried by the client)",
    )
    add(
        "--fail-status",
        type=int,
        default=503,
        metavar="STATUS",
        help="the status of --fail-next and --fail-fraction (default 503)",
    )
    add(
        "--fail-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="answer this fraction (0..1) of requests with --fail-status, at random",
    )
    add(
        "--retry-after",
        default=None,
        metavar="VALUE",
        help="send this Retry-After (seconds or an HTTP date) with every injected failure",
    )
    add(
        "--delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long before handling every request (a slow server)",
    )
    add(
        "--stall-next",
        type=int,
        default=0,
        metavar="K",
        help="hold the next K requests unanswered for --stall-seconds, then reset the "
        "connection (the client times out)",
    )
    add(
        "--stall-seconds",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long --stall-next holds a request (default 30)",
    )
    add(
        "--reset-next",
        type=int,
        default=0,
        metavar="K",
        help="reset the connection of the next K requests before reading them",
    )
    add(
        "--drop-after-accept-next",
        type=int,
        default=0,
        metavar="K",
        help="record the next K batches, then drop the connection unanswered (the client "
        "resends them: duplicates, as with a lost answer)",
    )
    add(
        "--max-body-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="answer 413 to bodies larger than this (the client splits the batch)",
    )
    add(
        "--reject-marker",
        default=None,
        metavar="KEY",
        help="answer 400 to any batch with a signal whose payload has this key (the client "
        "bisects the batch and drops only that signal)",
    )
    add(
        "--status-always",
        type=int,
        default=None,
        metavar="STATUS",
        help="answer every request with this status, e.g. 401 for a wrong app ID",
    )
    add("--seed", type=int, default=0, help="seed for --fail-fraction (default 0)")


def devserver_main(args: argparse.Namespace) -> int:
    """Build a :class:`FaultPlan` from parsed arguments and run the emulator.

    Returns the process exit status: 0 after a clean stop, 2 for a bad argument, 1 when the
    port cannot be bound.
    """
    try:
        faults = FaultPlan(
            **{a.name: getattr(args, a.name) for a in attrs.fields(FaultPlan)},
        )
        run_devserver(host=args.host, port=args.port, faults=faults)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
