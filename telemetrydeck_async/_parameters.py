"""The parameters every signal carries: which SDK sent it, and on what runtime.

TelemetryDeck's official SDKs add ``TelemetryDeck.SDK.*`` and ``TelemetryDeck.Device.*`` keys
to every payload so the dashboard can group signals by SDK, version, operating system and
architecture. These are computed once per client and merged into its base payload; nothing
here runs per signal.

Values follow the official SDKs where they have one: ``SDK.name`` is ``<Language>SDK``
(``SwiftSDK``, ``KotlinSDK``; ours is ``PythonAsyncSDK``), ``SDK.nameAndVersion`` joins name and
version with a space, and ``Device.operatingSystem`` / ``Device.architecture`` use the names the
Swift SDK sends (``macOS``, ``arm64``, ``x86_64``) so signals from Python land in the same
dashboard buckets.
"""

from __future__ import annotations

import platform
from typing import Final

from ._signal import PayloadValue
from ._version import __version__

__all__ = [
    "APP_VERSION_KEY",
    "SDK_NAME",
    "normalized_architecture",
    "normalized_operating_system",
    "sdk_parameters",
]

#: ``TelemetryDeck.SDK.name`` of this SDK. Official SDKs name themselves ``<Language>SDK``;
#: "Async" keeps it apart from any synchronous Python SDK in the same dashboard.
SDK_NAME: Final = "PythonAsyncSDK"

APP_VERSION_KEY: Final = "TelemetryDeck.AppInfo.version"

_OPERATING_SYSTEMS: Final = {"Darwin": "macOS", "Linux": "Linux", "Windows": "Windows"}
_ARCHITECTURES: Final = {
    "amd64": "x86_64",
    "x86_64": "x86_64",
    "x64": "x86_64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "x86",
    "i686": "x86",
    "x86": "x86",
}


def normalized_operating_system(system: str | None = None) -> str:
    """``platform.system()`` in the official SDKs' spelling (``macOS``, ``Linux``, ``Windows``).

    Other systems (``FreeBSD``, ``Java``…) are sent as Python reports them; ``unknown`` if empty.
    """
    system = platform.system() if system is None else system
    return _OPERATING_SYSTEMS.get(system, system) or "unknown"


def normalized_architecture(machine: str | None = None) -> str:
    """``platform.machine()`` with the usual aliases folded (``AMD64`` → ``x86_64``, …)."""
    machine = platform.machine() if machine is None else machine
    return _ARCHITECTURES.get(machine.lower(), machine) or "unknown"


def sdk_parameters(app_version: str | None = None) -> dict[str, PayloadValue]:
    """The ``TelemetryDeck.*`` parameters this SDK adds to every signal's payload."""
    params: dict[str, PayloadValue] = {
        "TelemetryDeck.SDK.name": SDK_NAME,
        "TelemetryDeck.SDK.version": __version__,
        "TelemetryDeck.SDK.nameAndVersion": f"{SDK_NAME} {__version__}",
        "TelemetryDeck.SDK.pythonVersion": platform.python_version(),
        "TelemetryDeck.Device.operatingSystem": normalized_operating_system(),
        "TelemetryDeck.Device.architecture": normalized_architecture(),
    }
    if app_version is not None:
        params[APP_VERSION_KEY] = app_version
    return params
