"""Presets: TelemetryDeck's named signals, with the exact types and keys the official SDKs use.

Dashboards have ready-made insights for these names (errors, navigation, purchases, acquisition,
activation, durations), so a Python service that sends them shows up there like a Swift or
Kotlin app. The names are reserved (they begin with ``TelemetryDeck.``), which is why callers
cannot send them through ``signal()`` and these methods exist.

:class:`Presets` is a mixin of :class:`~telemetrydeck_async.TelemetryClient`. Every preset
validates the caller's arguments (raising :class:`InvalidSignalError` naming the argument) and
then goes through the same path as ``signal()``: user hashing, default payload and SDK
parameters, prefixes, batching. The ``TelemetryDeck.`` keys a preset adds are always kept as
they are: neither the caller's payload nor a prefix can change them.

Every preset is a coroutine like ``signal()``. There are no ``_nowait`` twins: from synchronous
code on the loop thread, wrap the work in ``with td.duration(...)`` or use ``signal_nowait()``
for your own types.
"""

from __future__ import annotations

import abc
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Final, Literal, ParamSpec, TypeVar, overload

from ._signal import (
    PayloadValue,
    check_optional_text,
    check_utf8,
    normalize_payload,
    validate_float_value,
    validate_type,
)
from .exceptions import InvalidSignalError

__all__ = ["Duration", "ErrorCategory", "Presets", "PurchaseType", "exception_id"]

log = logging.getLogger("telemetrydeck_async")

#: The categories ``TelemetryDeck.Error.category`` accepts.
ErrorCategory = Literal["thrown-exception", "user-input", "app-state"]
#: The values ``TelemetryDeck.Purchase.type`` accepts.
PurchaseType = Literal["subscription", "one-time-purchase"]

_ERROR_CATEGORIES: Final = frozenset({"thrown-exception", "user-input", "app-state"})
_PURCHASE_TYPES: Final = frozenset({"subscription", "one-time-purchase"})

# Signal types and parameter keys, spelled exactly as the official SDKs spell them.
SESSION_STARTED: Final = "TelemetryDeck.Session.started"
DURATION_KEY: Final = "TelemetryDeck.Signal.durationInSeconds"
ERROR_OCCURRED: Final = "TelemetryDeck.Error.occurred"
ERROR_ID: Final = "TelemetryDeck.Error.id"
ERROR_MESSAGE: Final = "TelemetryDeck.Error.message"
ERROR_CATEGORY: Final = "TelemetryDeck.Error.category"
NAVIGATION_PATH_CHANGED: Final = "TelemetryDeck.Navigation.pathChanged"
PURCHASE_COMPLETED: Final = "TelemetryDeck.Purchase.completed"
PURCHASE_FREE_TRIAL_STARTED: Final = "TelemetryDeck.Purchase.freeTrialStarted"
PURCHASE_CONVERTED_FROM_TRIAL: Final = "TelemetryDeck.Purchase.convertedFromTrial"
NEW_INSTALL_DETECTED: Final = "TelemetryDeck.Acquisition.newInstallDetected"
USER_ACQUIRED: Final = "TelemetryDeck.Acquisition.userAcquired"
LEAD_STARTED: Final = "TelemetryDeck.Acquisition.leadStarted"
LEAD_CONVERTED: Final = "TelemetryDeck.Acquisition.leadConverted"
ONBOARDING_COMPLETED: Final = "TelemetryDeck.Activation.onboardingCompleted"
CORE_FEATURE_USED: Final = "TelemetryDeck.Activation.coreFeatureUsed"

# A message taken from an exception is cut here: exception texts can be huge (a whole response
# body), and an error report must never be refused for its size.
_MAX_EXCEPTION_MESSAGE: Final = 500

_P = ParamSpec("_P")
_R = TypeVar("_R")


def exception_id(exc_type: type[BaseException]) -> str:
    """The ``TelemetryDeck.Error.id`` of an exception class: its qualified name.

    ``module.QualName`` (``json.decoder.JSONDecodeError``, ``myapp.billing.CardDeclined``);
    built-in exceptions are just ``ValueError``, ``KeyError``...
    """
    module = getattr(exc_type, "__module__", None)
    name = getattr(exc_type, "__qualname__", None) or exc_type.__name__
    if not module or module == "builtins":
        return name
    return f"{module}.{name}"


def _text(field: str, value: object, *, allow_empty: bool = False) -> str:
    """``value`` as a plain str, or ``InvalidSignalError`` naming ``field``."""
    if not isinstance(value, str):
        raise InvalidSignalError(field, f"must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidSignalError(field, "must be a non-empty string")
    text = str.__str__(value)
    check_utf8(field, text)
    return text


def _optional_text(field: str, value: object) -> str | None:
    return None if value is None else _text(field, value)


def _amount(field: str, value: object) -> float:
    try:
        amount = validate_float_value(value)
    except InvalidSignalError as exc:
        raise InvalidSignalError(field, exc.reason) from None
    if amount < 0:
        raise InvalidSignalError(field, f"must not be negative, got {amount!r}")
    return amount


def _check_common(client_user: object, session_id: object, test_mode: object) -> None:
    """The checks ``signal()`` makes on these arguments, made early (before a timed block)."""
    check_optional_text("client_user", client_user)
    check_optional_text("session_id", session_id, exact=True)
    if test_mode is not None and type(test_mode) is not bool:
        raise InvalidSignalError("test_mode", "must be a bool or None")


def _purchase_params(
    purchase_type: object,
    product_id: object,
    country_code: object,
    currency_code: object,
) -> dict[str, PayloadValue]:
    if purchase_type not in _PURCHASE_TYPES:
        raise InvalidSignalError(
            "purchase_type", f"must be 'subscription' or 'one-time-purchase', got {purchase_type!r}"
        )
    params: dict[str, PayloadValue] = {"TelemetryDeck.Purchase.type": str(purchase_type)}
    for key, field, value in (
        ("TelemetryDeck.Purchase.countryCode", "country_code", country_code),
        ("TelemetryDeck.Purchase.currencyCode", "currency_code", currency_code),
        ("TelemetryDeck.Purchase.productID", "product_id", product_id),
    ):
        text = _optional_text(field, value)
        if text is not None:
            params[key] = text
    return params


class Presets(abc.ABC):
    """The preset methods of :class:`~telemetrydeck_async.TelemetryClient`.

    Each sends one signal with an exact TelemetryDeck name. All accept the same keyword
    arguments as ``signal()`` for who and where: ``client_user``, ``session_id``, ``payload``
    (your own extra keys, validated and prefixed like ``signal()``'s) and ``test_mode``.
    """

    # Provided by TelemetryClient: the paths of signal() and signal_nowait() that let a preset
    # use its reserved type and keys. Abstract here so this module type-checks on its own.
    @abc.abstractmethod
    async def _emit(
        self,
        signal_type: str,
        params: dict[str, PayloadValue],
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        float_value: float | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Queue a preset's signal like ``signal()`` (``params``: its TelemetryDeck keys)."""

    @abc.abstractmethod
    def _emit_nowait(
        self,
        signal_type: str,
        params: dict[str, PayloadValue],
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        float_value: float | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Queue a preset's signal like ``signal_nowait()``."""

    @abc.abstractmethod
    def _nowait_ready(self) -> bool:
        """True when a synchronous preset may queue now (a running loop, an open client)."""

    # ----------------------------------------------------------------------------- duration

    def duration(
        self,
        signal_type: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        float_value: float | None = None,
        test_mode: bool | None = None,
    ) -> Duration:
        """Time a block or a function and send ``signal_type`` with its duration.

        The signal carries ``TelemetryDeck.Signal.durationInSeconds`` (a string with three
        decimals, e.g. ``"1.250"``). If the block raises, the signal is still sent, with
        ``TelemetryDeck.Error.id`` (the exception's qualified type name) and
        ``TelemetryDeck.Error.category`` = ``thrown-exception`` added, and the exception
        propagates unchanged::

            async with td.duration("Report.generated", payload={"Report.kind": "pdf"}):
                await build_report()

            @td.duration("Import.finished")
            async def run_import() -> None: ...

        Works with ``async with``, with plain ``with`` (synchronous code on the loop thread),
        and as a decorator of async or sync functions (each call is timed on its own).
        Arguments are validated here, before anything runs.
        """
        return Duration(
            self,
            signal_type,
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            float_value=float_value,
            test_mode=test_mode,
        )

    # ----------------------------------------------------------------------------- errors

    async def error(
        self,
        error: BaseException | str,
        *,
        message: str | None = None,
        category: ErrorCategory | None = None,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Send ``TelemetryDeck.Error.occurred`` for an exception or an error id of your own.

        With an exception: ``TelemetryDeck.Error.id`` is its qualified type name (see
        :func:`exception_id`), ``.message`` is ``str(exc)`` cut to 500 characters unless you
        pass ``message`` (pass ``message=""`` to send none: exception texts can contain user
        input), and ``.category`` defaults to ``thrown-exception``. Only the type and the text
        are read: never the traceback or its local variables.

        With a str: it is the ``TelemetryDeck.Error.id``; ``message`` and ``category`` are
        sent only when given. ``category`` must be ``thrown-exception``, ``user-input`` or
        ``app-state``.
        """
        if isinstance(error, BaseException):
            error_id = exception_id(type(error))
            if message is None:
                message = _exception_message(error)
            if category is None:
                category = "thrown-exception"
        else:
            error_id = _text("error", error)
        params: dict[str, PayloadValue] = {ERROR_ID: error_id}
        if message is not None:
            text = _text("message", message, allow_empty=True)
            if text:
                params[ERROR_MESSAGE] = text
        if category is not None:
            if category not in _ERROR_CATEGORIES:
                raise InvalidSignalError(
                    "category",
                    f"must be 'thrown-exception', 'user-input' or 'app-state', got {category!r}",
                )
            params[ERROR_CATEGORY] = category
        await self._emit(
            ERROR_OCCURRED,
            params,
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            test_mode=test_mode,
        )

    # ----------------------------------------------------------------------------- navigation

    async def navigation(
        self,
        source: str,
        destination: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Send ``TelemetryDeck.Navigation.pathChanged`` for a move from one path to another.

        Adds ``TelemetryDeck.Navigation.schemaVersion`` = ``"1"``, ``.identifier`` =
        ``"{source} -> {destination}"``, ``.sourcePath`` and ``.destinationPath``. ``source``
        may be ``""`` for an entry point; ``destination`` must not be empty.
        """
        src = _text("source", source, allow_empty=True)
        dst = _text("destination", destination)
        await self._emit(
            NAVIGATION_PATH_CHANGED,
            {
                "TelemetryDeck.Navigation.schemaVersion": "1",
                "TelemetryDeck.Navigation.identifier": f"{src} -> {dst}",
                "TelemetryDeck.Navigation.sourcePath": src,
                "TelemetryDeck.Navigation.destinationPath": dst,
            },
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            test_mode=test_mode,
        )

    # ----------------------------------------------------------------------------- purchases

    async def purchase_completed(
        self,
        amount_usd: float,
        *,
        purchase_type: PurchaseType,
        product_id: str | None = None,
        country_code: str | None = None,
        currency_code: str | None = None,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Send ``TelemetryDeck.Purchase.completed`` with ``floatValue`` = ``amount_usd``.

        ``amount_usd`` is the price in US dollars (the dashboard sums it as revenue; convert
        other currencies first). ``purchase_type`` is ``subscription`` or
        ``one-time-purchase``; ``product_id``, ``country_code`` and ``currency_code`` (the
        currency the customer paid in) are sent when given, as ``TelemetryDeck.Purchase.*``.
        """
        amount = _amount("amount_usd", amount_usd)
        await self._emit(
            PURCHASE_COMPLETED,
            _purchase_params(purchase_type, product_id, country_code, currency_code),
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            float_value=amount,
            test_mode=test_mode,
        )

    async def free_trial_started(
        self,
        *,
        purchase_type: PurchaseType = "subscription",
        product_id: str | None = None,
        country_code: str | None = None,
        currency_code: str | None = None,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Send ``TelemetryDeck.Purchase.freeTrialStarted`` (same parameters as a purchase)."""
        await self._emit(
            PURCHASE_FREE_TRIAL_STARTED,
            _purchase_params(purchase_type, product_id, country_code, currency_code),
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            test_mode=test_mode,
        )

    async def converted_from_trial(
        self,
        *,
        amount_usd: float | None = None,
        purchase_type: PurchaseType = "subscription",
        product_id: str | None = None,
        country_code: str | None = None,
        currency_code: str | None = None,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Send ``TelemetryDeck.Purchase.convertedFromTrial``; ``amount_usd`` as ``floatValue``."""
        amount = None if amount_usd is None else _amount("amount_usd", amount_usd)
        await self._emit(
            PURCHASE_CONVERTED_FROM_TRIAL,
            _purchase_params(purchase_type, product_id, country_code, currency_code),
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            float_value=amount,
            test_mode=test_mode,
        )

    # ----------------------------------------------------------------------------- acquisition

    async def new_install_detected(
        self,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Send ``TelemetryDeck.Acquisition.newInstallDetected``.

        The client sends it by itself once, when it creates the default-user file (a first
        run); call this when your application detects new installations its own way.
        """
        await self._emit(
            NEW_INSTALL_DETECTED,
            {},
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            test_mode=test_mode,
        )

    async def user_acquired(
        self,
        channel: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Send ``TelemetryDeck.Acquisition.userAcquired`` with ``.channel`` (e.g. ``"ads"``)."""
        await self._emit(
            USER_ACQUIRED,
            {"TelemetryDeck.Acquisition.channel": _text("channel", channel)},
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            test_mode=test_mode,
        )

    async def lead_started(
        self,
        lead_id: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Send ``TelemetryDeck.Acquisition.leadStarted`` with ``.leadID``."""
        await self._emit(
            LEAD_STARTED,
            {"TelemetryDeck.Acquisition.leadID": _text("lead_id", lead_id)},
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            test_mode=test_mode,
        )

    async def lead_converted(
        self,
        lead_id: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Send ``TelemetryDeck.Acquisition.leadConverted`` with ``.leadID``."""
        await self._emit(
            LEAD_CONVERTED,
            {"TelemetryDeck.Acquisition.leadID": _text("lead_id", lead_id)},
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            test_mode=test_mode,
        )

    # ----------------------------------------------------------------------------- activation

    async def onboarding_completed(
        self,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Send ``TelemetryDeck.Activation.onboardingCompleted``."""
        await self._emit(
            ONBOARDING_COMPLETED,
            {},
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            test_mode=test_mode,
        )

    async def core_feature_used(
        self,
        name: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        test_mode: bool | None = None,
    ) -> None:
        """Send ``TelemetryDeck.Activation.coreFeatureUsed`` with ``.featureName`` = ``name``."""
        await self._emit(
            CORE_FEATURE_USED,
            {"TelemetryDeck.Activation.featureName": _text("name", name)},
            client_user=client_user,
            session_id=session_id,
            payload=payload,
            test_mode=test_mode,
        )


def _exception_message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not turn an error report into a new error
        return ""
    if len(text) > _MAX_EXCEPTION_MESSAGE:
        text = text[: _MAX_EXCEPTION_MESSAGE - 1] + "…"
    return text


class Duration:
    """A timer from :meth:`Presets.duration`: a context manager (sync and async) and decorator.

    One object times one block at a time; as a decorator it makes a fresh timer per call, so
    concurrent calls of the decorated function are timed independently.
    """

    __slots__ = (
        "_client",
        "_client_user",
        "_float_value",
        "_payload",
        "_session_id",
        "_started",
        "_test_mode",
        "_type",
    )

    def __init__(
        self,
        client: Presets,
        signal_type: str,
        *,
        client_user: str | None = None,
        session_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
        float_value: float | None = None,
        test_mode: bool | None = None,
    ) -> None:
        self._type = validate_type(signal_type)
        self._payload = None if payload is None else normalize_payload(payload)
        self._float_value = None if float_value is None else validate_float_value(float_value)
        _check_common(client_user, session_id, test_mode)
        self._client = client
        self._client_user = client_user
        self._session_id = session_id
        self._test_mode = test_mode
        self._started: float | None = None

    @property
    def signal_type(self) -> str:
        """The signal type this timer sends (before any ``signal_prefix``)."""
        return self._type

    def _copy(self) -> Duration:
        twin = object.__new__(Duration)
        for name in Duration.__slots__:
            setattr(twin, name, getattr(self, name))
        twin._started = None
        return twin

    def _start(self) -> None:
        if self._started is not None:
            raise RuntimeError(
                f"this duration timer for {self._type!r} is already running; "
                "create one per block (or use it as a decorator)"
            )
        self._started = time.perf_counter()

    def _params(self, exc: BaseException | None) -> dict[str, PayloadValue]:
        started, self._started = self._started, None
        elapsed = 0.0 if started is None else time.perf_counter() - started
        params: dict[str, PayloadValue] = {DURATION_KEY: f"{elapsed:.3f}"}
        if exc is not None:
            params[ERROR_ID] = exception_id(type(exc))
            params[ERROR_CATEGORY] = "thrown-exception"
        return params

    def _send(self, exc: BaseException | None) -> None:
        params = self._params(exc)
        try:
            # The nowait path even from ``async with``: a block that is being cancelled must not
            # wait here for queue room.
            self._client._emit_nowait(
                self._type,
                params,
                client_user=self._client_user,
                session_id=self._session_id,
                payload=self._payload,
                float_value=self._float_value,
                test_mode=self._test_mode,
            )
        except Exception:
            if exc is None:
                raise
            # Never hide the block's own exception behind a telemetry problem.
            log.warning("could not send the duration signal %r", self._type, exc_info=True)

    async def __aenter__(self) -> Duration:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._send(exc)

    def __enter__(self) -> Duration:
        # Fail before the block runs, not after: sync use needs the client's loop thread.
        self._client._nowait_ready()
        self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._send(exc)

    @overload
    def __call__(
        self, func: Callable[_P, Awaitable[_R]]
    ) -> Callable[_P, Awaitable[_R]]: ...  # pragma: no cover

    @overload
    def __call__(self, func: Callable[_P, _R]) -> Callable[_P, _R]: ...  # pragma: no cover

    def __call__(self, func: Callable[_P, Any]) -> Callable[_P, Any]:
        """Decorate ``func`` (async or sync): every call is timed and sends one signal."""
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def timed_async(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                async with self._copy():
                    return await func(*args, **kwargs)

            return timed_async

        @functools.wraps(func)
        def timed_sync(*args: _P.args, **kwargs: _P.kwargs) -> Any:
            with self._copy():
                return func(*args, **kwargs)

        return timed_sync
