"""Client options: one frozen, validated value built once per client.

A wrong option fails at construction with :class:`ConfigurationError` (a ``ValueError``) naming
the option, never later inside the background task.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import ssl as _ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import attrs

from ._retry import RetryPolicy
from ._signal import (
    SDK_KEY_PREFIX,
    PayloadValue,
    check_optional_text,
    lone_surrogate,
    normalize_payload,
)
from .exceptions import ConfigurationError, InvalidSignalError

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_VARIABLES",
    "BeforeSend",
    "ClientConfig",
    "Durability",
    "OnDrop",
    "OnError",
    "disabled_by_env",
    "is_loopback",
    "options_from_env",
]

log = logging.getLogger("telemetrydeck_async")

DEFAULT_BASE_URL: Final = "https://nom.telemetrydeck.com"

Durability = Literal["spill", "always"]
#: ``on_drop(signals, reason)``: the dropped signals as JSON objects, and the reason.
OnDrop = Callable[[Sequence[Mapping[str, Any]], str], None]
#: ``on_error(exc)``: a delivery or spool error the background task handled.
OnError = Callable[[BaseException], None]
#: ``before_send(signal) -> signal | None``: sees each accepted signal as a plain dict with the
#: wire names (``type``, ``payload``, ``floatValue``, ``sessionID``, ``isTestMode``); returns
#: it (changed or not), or None to drop it.
BeforeSend = Callable[[dict[str, Any]], "dict[str, Any] | None"]

# Reverse-DNS style, URL-safe without escaping: letters, digits, dot, dash, underscore.
# At most 255 characters, like a DNS name: it goes into the request line, which servers bound.
_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_LOOPBACK_NAMES: Final = frozenset({"localhost"})


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (never proxied, http:// allowed)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(value: str) -> str:
    """Return ``value`` without a trailing slash if it is a usable ingest base URL.

    ``https://`` is required; ``http://`` only for loopback hosts (the local emulator, tests).
    """
    if not isinstance(value, str) or not value:
        raise ConfigurationError("base_url", "must be a non-empty URL string")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- parsed lazily: a bad port raises here, not later
    except ValueError as exc:
        raise ConfigurationError(
            "base_url",
            f"is not a valid URL ({exc}): got {value!r}; use e.g. 'https://nom.telemetrydeck.com'",
        ) from None
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        pass
    elif parts.scheme == "http" and host:
        if not is_loopback(host):
            raise ConfigurationError(
                "base_url",
                f"plain http:// is allowed only for loopback hosts, got {host!r}; use https://",
            )
    else:
        raise ConfigurationError("base_url", f"must be an https:// URL with a host, got {value!r}")
    if parts.query or parts.fragment:
        raise ConfigurationError("base_url", "must not have a query string or fragment")
    path = parts.path.rstrip("/")
    if "/v2/" in path + "/":
        # The most common mistake: the full endpoint pasted where the server root belongs.
        raise ConfigurationError(
            "base_url",
            f"must be the server root, without the API path (got {value!r}); the client "
            "appends /v2/namespace/<namespace>/ itself, e.g. base_url="
            f"{parts.scheme + '://' + parts.netloc!r}",
        )
    # Any other path is kept as a prefix (a gateway that serves the API under /telemetry):
    # requests go to {base_url}/v2/namespace/{namespace}/.
    return value.rstrip("/")


def _check_proxy(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigurationError("proxy", "must be a proxy URL such as 'http://proxy:3128' or None")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ConfigurationError("proxy", "is not a valid URL (check the port)") from None
    if parts.scheme != "http" or not parts.hostname:
        # Never echo the value: it may hold a password.
        raise ConfigurationError(
            "proxy",
            "must be an http:// URL with a host, e.g. 'http://user:password@proxy.example:3128' "
            "(TLS to the endpoint still goes through the proxy's CONNECT tunnel)",
        )
    if port is None:
        raise ConfigurationError("proxy", "must name the proxy's port, e.g. ':3128'")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ConfigurationError("proxy", "must not have a path, query or fragment")
    return value


def _make_ssl_context(value: object) -> _ssl.SSLContext | None:
    if value is None:
        return None
    if isinstance(value, _ssl.SSLContext):
        if value.verify_mode == _ssl.CERT_NONE or not value.check_hostname:
            log.warning(
                "the ssl= context does not verify the server's certificate%s: anyone on the "
                "path can read and change the signals; pass the CA bundle instead",
                "" if value.verify_mode == _ssl.CERT_NONE else " host name",
            )
        return value
    if isinstance(value, bool):
        # No boolean shortcut: verification stays on unless a context turns it off knowingly.
        raise ConfigurationError(
            "ssl",
            "takes a CA bundle path or an ssl.SSLContext, not a bool: certificates are always "
            "verified (the default, None, uses the system's trust store); to trust a private "
            "or proxy CA pass its bundle, e.g. ssl='/etc/ssl/corp-ca.pem'",
        )
    path = _fspath("ssl", value, "a CA bundle path or an ssl.SSLContext")
    try:
        if os.path.isdir(path):
            return _ssl.create_default_context(capath=path)
        return _ssl.create_default_context(cafile=path)
    except (OSError, _ssl.SSLError) as exc:
        raise ConfigurationError(
            "ssl",
            f"cannot load the CA bundle {path!r} ({exc}); pass a PEM file of CA certificates "
            "or a directory of hashed ones",
        ) from None


def _check_before_send(_inst: object, _attr: object, value: BeforeSend | None) -> None:
    if value is not None and not callable(value):
        raise ConfigurationError(
            "before_send",
            f"must be a function taking the signal dict and returning it or None, "
            f"got {type(value).__name__}",
        )


def _check_spool_dir(_inst: object, attr: attrs.Attribute[str | None], value: object) -> None:
    _check_optional_str(_inst, attr, value)
    # Certain at construction: a path that exists and is not a directory can never work.
    # Everything else (missing, read-only, full) is found out when the spool opens.
    if isinstance(value, str) and os.path.exists(value) and not os.path.isdir(value):
        raise ConfigurationError(
            "spool_dir",
            f"{value!r} exists and is not a directory; pass a directory path (it is created "
            "if missing) or None for memory only",
        )


def _check_namespace(_inst: object, _attr: object, value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _NAMESPACE_RE.fullmatch(value):
        raise ConfigurationError(
            "namespace",
            f"must be the URL-safe namespace from the dashboard (letters, digits, '.', '-', "
            f"'_'; at most 255 characters; e.g. 'com.example'), got {value!r:.100}",
        )


def _check_app_id(_inst: object, _attr: object, value: str) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(
            "app_id",
            f"must be a str (the app ID from the dashboard, e.g. 'B97579B6-FFB8-4AC5-AAA7-"
            f"DA5796CC5DCE'), got {type(value).__name__} {value!r:.60}",
        )
    if not value.strip():
        raise ConfigurationError(
            "app_id", "must be the non-empty app ID from the dashboard, got an empty str"
        )


def _positive_int(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or value <= 0:
        raise ConfigurationError(attr.name, f"must be a positive int, got {value!r}")


def _positive_float(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(attr.name, f"must be a positive number of seconds, got {value!r}")


def _normalize_default_payload(value: Mapping[str, Any] | None) -> Mapping[str, PayloadValue]:
    if value is None:
        return {}
    try:
        return normalize_payload(value)
    except InvalidSignalError as exc:
        raise ConfigurationError("default_payload", str(exc)) from None


def _check_durability(_inst: object, _attr: object, value: str) -> None:
    if value not in ("spill", "always"):
        raise ConfigurationError("durability", f"must be 'spill' or 'always', got {value!r}")


def _check_optional_str(_inst: object, attr: attrs.Attribute[str | None], value: object) -> None:
    check_optional_text(attr.name, value, ConfigurationError)


def _check_prefix(_inst: object, attr: attrs.Attribute[str | None], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value:
        raise ConfigurationError(attr.name, "must be a non-empty str (e.g. 'MyApp.') or None")
    if value.startswith(SDK_KEY_PREFIX):
        raise ConfigurationError(
            attr.name, f"must not begin with {SDK_KEY_PREFIX!r}: that prefix is reserved"
        )


def _fspath(option: str, value: object, wanted: str) -> str:
    """``value`` as a str path (``os.PathLike`` accepted), or ``ConfigurationError``."""
    try:
        path = os.fspath(value)  # type: ignore[call-overload]  # checked by the except below
    except TypeError:
        raise ConfigurationError(option, f"must be {wanted}, got {type(value).__name__}") from None
    return path if isinstance(path, str) else os.fsdecode(path)


def _optional_path(value: object) -> str | None:
    if value is None:
        return None
    path = _fspath("default_user_file", value, "a path or None")
    if not path:
        raise ConfigurationError("default_user_file", "must be a non-empty str path or None")
    return path


def _check_retry(_inst: object, _attr: object, value: object) -> None:
    if not isinstance(value, RetryPolicy):
        raise ConfigurationError("retry", "must be a telemetrydeck_async.RetryPolicy")


@attrs.frozen(kw_only=True)
class ClientConfig:
    """Every option of a :class:`~telemetrydeck_async.TelemetryClient`, validated.

    See the client's docstring for what each option means; defaults match the official SDKs
    where they have one (100 signals per request) and favour bounded memory elsewhere.
    """

    app_id: str = attrs.field(validator=_check_app_id)
    namespace: str | None = attrs.field(default=None, validator=_check_namespace)
    base_url: str = attrs.field(default=DEFAULT_BASE_URL, converter=check_base_url)
    salt: str = attrs.field(default="", repr=False)
    default_user: str | None = attrs.field(default=None, repr=False, validator=_check_optional_str)
    session_id: str | None = attrs.field(default=None, validator=_check_optional_str)
    test_mode: bool = False
    default_payload: Mapping[str, PayloadValue] = attrs.field(
        factory=dict, converter=_normalize_default_payload
    )
    batch_size: int = attrs.field(default=100, validator=_positive_int)
    max_batch_bytes: int = attrs.field(default=1024 * 1024, validator=_positive_int)
    flush_interval: float = attrs.field(default=5.0, validator=_positive_float)
    max_queue_size: int = attrs.field(default=50_000, validator=_positive_int)
    request_timeout: float = attrs.field(default=10.0, validator=_positive_float)
    close_timeout: float = attrs.field(default=10.0, validator=_positive_float)
    max_concurrent_requests: int = attrs.field(default=2, validator=_positive_int)
    retry: RetryPolicy = attrs.field(factory=RetryPolicy, validator=_check_retry)
    spool_dir: str | None = attrs.field(default=None, validator=_check_spool_dir)
    durability: Durability = attrs.field(default="spill", validator=_check_durability)
    spool_max_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_positive_int)
    spool_max_age: float = attrs.field(default=7 * 86400.0, validator=_positive_float)
    on_drop: OnDrop | None = None
    on_error: OnError | None = None
    app_version: str | None = attrs.field(default=None, validator=_check_optional_str)
    signal_prefix: str | None = attrs.field(default=None, validator=_check_prefix)
    payload_prefix: str | None = attrs.field(default=None, validator=_check_prefix)
    default_user_file: str | None = attrs.field(default=None, converter=_optional_path)
    enabled: bool = True
    proxy: str | None = attrs.field(default=None, repr=False, converter=_check_proxy)
    ssl: _ssl.SSLContext | None = attrs.field(default=None, converter=_make_ssl_context)
    trust_env: bool = True
    before_send: BeforeSend | None = attrs.field(default=None, validator=_check_before_send)

    def __attrs_post_init__(self) -> None:
        if type(self.salt) is not str:
            raise ConfigurationError("salt", "must be a str (the empty string is the default)")
        if type(self.test_mode) is not bool:
            raise ConfigurationError("test_mode", "must be a bool")
        if type(self.enabled) is not bool:
            raise ConfigurationError("enabled", "must be a bool")
        if type(self.trust_env) is not bool:
            raise ConfigurationError("trust_env", "must be a bool")
        # Text that ends up in every signal: one that cannot be encoded would fail every batch.
        for name in (
            "app_id",
            "salt",
            "default_user",
            "session_id",
            "app_version",
            "signal_prefix",
            "payload_prefix",
        ):
            value = getattr(self, name)
            bad = lone_surrogate(value) if isinstance(value, str) else None
            if bad is not None:
                raise ConfigurationError(
                    name, f"contains the lone surrogate {bad!r}, which cannot be encoded as UTF-8"
                )
        if self.max_batch_bytes < 1024:
            raise ConfigurationError("max_batch_bytes", "must be at least 1024 bytes")

    @property
    def endpoint_url(self) -> str:
        """``{base_url}/v2/namespace/{namespace}/``, or ``{base_url}/v2/`` without a namespace."""
        if self.namespace is None:
            return f"{self.base_url}/v2/"
        return f"{self.base_url}/v2/namespace/{self.namespace}/"


#: The environment variables ``TelemetryClient.from_env()`` reads, and the option each sets.
ENV_VARIABLES: Final[Mapping[str, str]] = {
    "TELEMETRYDECK_APP_ID": "app_id",
    "TELEMETRYDECK_NAMESPACE": "namespace",
    "TELEMETRYDECK_SALT": "salt",
    "TELEMETRYDECK_TEST_MODE": "test_mode",
    "TELEMETRYDECK_BASE_URL": "base_url",
    "TELEMETRYDECK_SPOOL_DIR": "spool_dir",
}

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"", "0", "false", "no", "off"})


def disabled_by_env(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``TELEMETRYDECK_DISABLED`` is set to anything but ``0/false/no/off``/empty.

    Read by every client, not only ``from_env()``: it is the user's opt-out, so an unexpected
    value errs on the side of sending nothing rather than failing the application.
    """
    value = (os.environ if environ is None else environ).get("TELEMETRYDECK_DISABLED", "")
    return value.strip().lower() not in _FALSE


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Client options from the ``TELEMETRYDECK_*`` variables that are set and non-empty.

    ``TELEMETRYDECK_TEST_MODE`` must be ``1/true/yes/on`` or ``0/false/no/off``; anything else
    raises :class:`ConfigurationError` naming the variable.
    """
    env = os.environ if environ is None else environ
    options: dict[str, Any] = {}
    for variable, option in ENV_VARIABLES.items():
        raw = env.get(variable, "")
        if not raw.strip():
            continue
        if option == "test_mode":
            flag = raw.strip().lower()
            if flag not in _TRUE and flag not in _FALSE:
                raise ConfigurationError(
                    variable, f"must be one of 1/true/yes/on or 0/false/no/off, got {raw!r}"
                )
            options[option] = flag in _TRUE
        elif option == "salt":
            options[option] = raw  # whitespace may be part of a salt: keep it as given
        else:
            options[option] = raw.strip()
    return options
