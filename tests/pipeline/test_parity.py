"""TelemetryDeck parity: SDK parameters, prefixes, default user, sessions, from_env, opt-out."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import stat
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from telemetrydeck_async import ConfigurationError, InvalidSignalError, TelemetryClient
from telemetrydeck_async._identity import default_user_path, load_or_create_default_user
from telemetrydeck_async.devserver import IngestEmulator
from tests.helpers import ClientFactory, sdk_parameters, sha256_hex

# ----------------------------------------------------------------------------- SDK parameters


async def test_every_signal_carries_the_sdk_parameters(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Name, version, nameAndVersion, Python version, OS and architecture are on each signal."""
    td = make_client()
    await td.signal("App.launched")
    await td.signal("App.tick", payload={"Test.id": 1})
    await td.flush()
    assert [s["payload"] for s in emulator.signals] == [
        sdk_parameters(),
        {"Test.id": 1, **sdk_parameters()},
    ]


async def test_app_version_is_sent_as_appinfo_version(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """app_version= adds TelemetryDeck.AppInfo.version; without it the key is absent."""
    with_version = make_client(app_version="2.4.1")
    without = make_client()
    await with_version.signal("App.launched")
    await without.signal("App.launched")
    await with_version.flush()
    await without.flush()
    versions = [s["payload"].get("TelemetryDeck.AppInfo.version") for s in emulator.signals]
    assert sorted(versions, key=str) == ["2.4.1", None]


async def test_sdk_parameters_are_computed_once_per_client(
    make_client: ClientFactory, emulator: IngestEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runtime facts are read at construction; later signals reuse them, never re-read."""
    td = make_client()

    def fail() -> str:
        raise AssertionError("platform was queried again after construction")

    monkeypatch.setattr(platform, "system", fail)
    monkeypatch.setattr(platform, "machine", fail)
    monkeypatch.setattr(platform, "python_version", fail)
    for i in range(3):
        await td.signal("App.tick", payload={"Test.id": i})
    await td.flush()
    assert emulator.distinct_ids() == {0, 1, 2}
    assert all(s["payload"]["TelemetryDeck.SDK.name"] == "PythonAsyncSDK" for s in emulator.signals)


def test_default_payload_cannot_set_sdk_keys() -> None:
    """A TelemetryDeck.* key in default_payload is refused at construction."""
    with pytest.raises(ConfigurationError) as info:
        TelemetryClient("app", default_payload={"TelemetryDeck.SDK.name": "forged"})
    assert info.value.option == "default_payload"


async def test_call_payload_wins_over_default_payload(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """default_payload is merged under the call's payload; the call's value wins."""
    td = make_client(default_payload={"Plan.tier": "free", "Region.name": "eu"})
    await td.signal("App.launched", payload={"Plan.tier": "pro"})
    await td.flush()
    assert emulator.signals[0]["payload"] == {
        "Plan.tier": "pro",
        "Region.name": "eu",
        **sdk_parameters(),
    }


# ----------------------------------------------------------------------------- prefixes


async def test_signal_prefix_is_prepended_to_signal_types(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """signal_prefix applies to the caller's types, including a duration's type."""
    td = make_client(signal_prefix="Shop.")
    await td.signal("Checkout.completed")
    async with td.duration("Report.generated"):
        pass
    await td.flush()
    assert [s["type"] for s in emulator.signals] == [
        "Shop.Checkout.completed",
        "Shop.Report.generated",
    ]


async def test_signal_prefix_is_not_applied_to_telemetrydeck_types(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Preset types keep their exact TelemetryDeck. names under a signal_prefix."""
    td = make_client(signal_prefix="Shop.")
    await td.onboarding_completed()
    await td.flush()
    assert [s["type"] for s in emulator.signals] == ["TelemetryDeck.Activation.onboardingCompleted"]


async def test_payload_prefix_applies_to_call_and_default_payload_keys(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """payload_prefix renames the caller's keys and default keys, never TelemetryDeck. keys."""
    td = make_client(payload_prefix="Shop.", default_payload={"region": "eu"})
    await td.core_feature_used("Export.pdf", payload={"pages": 3})
    await td.flush()
    assert emulator.signals[0]["payload"] == {
        "Shop.region": "eu",
        "Shop.pages": 3,
        "TelemetryDeck.Activation.featureName": "Export.pdf",
        **sdk_parameters(),
    }


@pytest.mark.parametrize("option", ["signal_prefix", "payload_prefix"])
def test_reserved_prefix_is_refused(option: str) -> None:
    """A prefix beginning with TelemetryDeck. is refused at construction."""
    options: dict[str, Any] = {option: "TelemetryDeck.Mine."}
    with pytest.raises(ConfigurationError) as info:
        TelemetryClient("app", **options)
    assert info.value.option == option


# ----------------------------------------------------------------------------- default user


async def test_default_user_is_the_same_across_two_clients(
    make_client: ClientFactory, emulator: IngestEmulator, tmp_path: Path
) -> None:
    """Two clients using one default-user file send the same clientUser."""
    user_file = tmp_path / "user.id"
    first = make_client(default_user=None, default_user_file=user_file)
    await first.signal("App.launched")
    await first.aclose()
    second = make_client(default_user=None, default_user_file=user_file)
    await second.signal("App.launched")
    await second.aclose()
    users = {s["clientUser"] for s in emulator.signals if s["type"] == "App.launched"}
    assert users == {sha256_hex(user_file.read_text().strip())}


async def test_default_user_file_is_private_and_holds_a_random_uuid(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """The file is mode 0600 and holds a UUID4, nothing derived from the machine or login."""
    user_file = tmp_path / "user.id"
    td = make_client(default_user=None, default_user_file=user_file)
    await td.signal("App.launched")
    stored = user_file.read_text().strip()
    assert uuid.UUID(stored).version == 4
    assert platform.node() not in stored
    if sys.platform != "win32":
        assert stat.S_IMODE(user_file.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["user.id"]  # no temporary file left behind


async def test_default_user_lives_under_xdg_data_home_by_default(
    make_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without spool_dir or default_user_file the id goes to $XDG_DATA_HOME/telemetrydeck-async."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    if sys.platform in ("win32", "darwin"):
        pytest.skip("XDG_DATA_HOME is the Linux location")
    td = make_client(default_user=None)
    await td.signal("App.launched")
    (stored,) = (tmp_path / "telemetrydeck-async").iterdir()
    assert stored.name.startswith("default-user-")
    assert stored == default_user_path("test-app")


async def test_default_user_lives_in_spool_dir_when_set(tmp_path: Path) -> None:
    """With spool_dir, the id is kept beside the spool, shared by every worker using it."""
    path = default_user_path("test-app", spool_dir=str(tmp_path))
    assert path.parent == tmp_path
    assert path.name.startswith("default-user-")


async def test_default_user_file_differs_per_app_id() -> None:
    """Two app IDs get two files, so users are not linkable across apps."""
    assert default_user_path("app-one") != default_user_path("app-two")


async def test_new_install_is_detected_once_when_the_file_is_created(
    make_client: ClientFactory, emulator: IngestEmulator, tmp_path: Path
) -> None:
    """The first client to create the file sends newInstallDetected; a later one does not."""
    user_file = tmp_path / "user.id"
    first = make_client(default_user=None, default_user_file=user_file)
    await first.signal("App.launched")
    await first.signal("App.launched")
    await first.aclose()
    second = make_client(default_user=None, default_user_file=user_file)
    await second.signal("App.launched")
    await second.aclose()
    assert [s["type"] for s in emulator.signals] == [
        "TelemetryDeck.Acquisition.newInstallDetected",
        "App.launched",
        "App.launched",
        "App.launched",
    ]


def test_concurrent_first_runs_agree_on_one_default_user(tmp_path: Path) -> None:
    """Processes (here threads) creating the file at once all end up with the same id."""
    path = tmp_path / "user.id"
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(8)

    def first_run() -> None:
        barrier.wait()
        results.append(load_or_create_default_user(path))

    threads = [threading.Thread(target=first_run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {user for user, _ in results} == {path.read_text().strip()}
    assert [created for _, created in results].count(True) == 1


async def test_client_user_given_creates_no_default_user_file(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """Clients whose calls always name a user never create the default-user file."""
    user_file = tmp_path / "user.id"
    td = make_client(default_user=None, default_user_file=user_file)
    await td.signal("App.launched", client_user="alice")
    assert not user_file.exists()


async def test_damaged_default_user_file_is_replaced(
    make_client: ClientFactory, emulator: IngestEmulator, tmp_path: Path
) -> None:
    """An empty or garbled file is replaced by a fresh random id, which is then used."""
    user_file = tmp_path / "user.id"
    user_file.write_text("\x00\x01")
    td = make_client(default_user=None, default_user_file=user_file)
    await td.signal("App.launched")
    await td.flush()
    stored = user_file.read_text().strip()
    assert uuid.UUID(stored).version == 4
    assert emulator.signals[-1]["clientUser"] == sha256_hex(stored)


async def test_unwritable_default_user_location_falls_back_to_memory(
    make_client: ClientFactory,
    emulator: IngestEmulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the file cannot be written, signals still go out with a random id; one warning."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    user_file = blocker / "user.id"  # its parent is a file: mkdir fails even for root
    first = make_client(default_user=None, default_user_file=user_file)
    second = make_client(default_user=None, default_user_file=user_file)
    with caplog.at_level(logging.WARNING, logger="telemetrydeck_async"):
        await first.signal("App.launched")
        await second.signal("App.launched")
    await first.flush()
    await second.flush()
    assert len(emulator.signals) == 2
    assert len({s["clientUser"] for s in emulator.signals}) == 1  # one id per process
    warnings = [r for r in caplog.records if "cannot keep the default user id" in r.message]
    assert len(warnings) == 1


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX permissions (not root)"
)
async def test_read_only_home_does_not_crash_the_client(
    make_client: ClientFactory, emulator: IngestEmulator, tmp_path: Path
) -> None:
    """A read-only data directory makes the client fall back to an in-memory id."""
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o500)
    try:
        td = make_client(default_user=None, default_user_file=home / "sub" / "user.id")
        await td.signal("App.launched")
        await td.flush()
    finally:
        home.chmod(0o700)
    assert len(emulator.signals) == 1


# ----------------------------------------------------------------------------- sessions


async def test_each_client_gets_its_own_uuid4_session(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """Without session_id, each client sends a fresh UUID4 as sessionID."""
    first, second = make_client(), make_client()
    await first.signal("App.launched")
    await second.signal("App.launched")
    await first.flush()
    await second.flush()
    sessions = [s["sessionID"] for s in emulator.signals]
    assert len(set(sessions)) == 2
    assert all(uuid.UUID(s).version == 4 for s in sessions)


async def test_new_session_changes_the_session_of_later_signals(
    make_client: ClientFactory, emulator: IngestEmulator
) -> None:
    """After new_session(), signals carry the new UUID4; before it, the old one."""
    td = make_client()
    old = td.session_id
    await td.signal("App.before")
    new = await td.new_session()
    await td.signal("App.after")
    await td.flush()
    assert new != old
    assert td.session_id == new
    assert uuid.UUID(new).version == 4
    assert [(s["type"], s["sessionID"]) for s in emulator.signals] == [
        ("App.before", old),
        ("TelemetryDeck.Session.started", new),
        ("App.after", new),
    ]


# ----------------------------------------------------------------------------- from_env

ENV = {
    "TELEMETRYDECK_APP_ID": "ENV-APP",
    "TELEMETRYDECK_NAMESPACE": "com.example.env",
    "TELEMETRYDECK_SALT": "env-salt",
    "TELEMETRYDECK_TEST_MODE": "true",
    "TELEMETRYDECK_BASE_URL": "http://127.0.0.1:9",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No TELEMETRYDECK_* variables from the outer environment leak into a test."""
    for name in list(os.environ):
        if name.startswith("TELEMETRYDECK_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_from_env_reads_every_variable(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each TELEMETRYDECK_* variable sets its option."""
    for name, value in ENV.items():
        clean_env.setenv(name, value)
    clean_env.setenv("TELEMETRYDECK_SPOOL_DIR", str(tmp_path))
    td = TelemetryClient.from_env()
    config = td.config
    assert (config.app_id, config.namespace, config.salt) == (
        "ENV-APP",
        "com.example.env",
        "env-salt",
    )
    assert (config.test_mode, config.base_url, config.spool_dir) == (
        True,
        "http://127.0.0.1:9",
        str(tmp_path),
    )


def test_from_env_keyword_overrides_win(clean_env: pytest.MonkeyPatch) -> None:
    """A keyword argument beats the environment variable for the same option."""
    for name, value in ENV.items():
        clean_env.setenv(name, value)
    td = TelemetryClient.from_env(namespace="com.example.kw", test_mode=False, app_id="KW")
    assert (td.config.app_id, td.config.namespace, td.config.test_mode) == (
        "KW",
        "com.example.kw",
        False,
    )


def test_from_env_without_app_id_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    """A missing TELEMETRYDECK_APP_ID is a ConfigurationError that names it."""
    with pytest.raises(ConfigurationError) as info:
        TelemetryClient.from_env()
    assert info.value.option == "TELEMETRYDECK_APP_ID"
    assert "TELEMETRYDECK_APP_ID" in str(info.value)


def test_from_env_treats_an_empty_variable_as_unset(clean_env: pytest.MonkeyPatch) -> None:
    """An empty TELEMETRYDECK_APP_ID is missing, not an empty app ID."""
    clean_env.setenv("TELEMETRYDECK_APP_ID", "")
    with pytest.raises(ConfigurationError) as info:
        TelemetryClient.from_env()
    assert info.value.option == "TELEMETRYDECK_APP_ID"


def test_from_env_refuses_an_unreadable_test_mode(clean_env: pytest.MonkeyPatch) -> None:
    """TELEMETRYDECK_TEST_MODE must be a recognisable boolean; the error names it."""
    clean_env.setenv("TELEMETRYDECK_APP_ID", "A")
    clean_env.setenv("TELEMETRYDECK_TEST_MODE", "maybe")
    with pytest.raises(ConfigurationError) as info:
        TelemetryClient.from_env()
    assert info.value.option == "TELEMETRYDECK_TEST_MODE"


def test_from_env_with_disabled_needs_no_app_id(clean_env: pytest.MonkeyPatch) -> None:
    """TELEMETRYDECK_DISABLED=1 gives a disabled client even without any configuration."""
    clean_env.setenv("TELEMETRYDECK_DISABLED", "1")
    td = TelemetryClient.from_env()
    assert td.enabled is False


# ----------------------------------------------------------------------------- opt-out


async def test_disabled_client_sends_nothing_and_starts_no_task(
    emulator: IngestEmulator, tmp_path: Path
) -> None:
    """enabled=False: signals and presets are no-ops; no task, no file, no request, zero stats."""
    user_file = tmp_path / "user.id"
    async with TelemetryClient(
        "app", base_url=emulator.base_url, enabled=False, default_user_file=user_file
    ) as td:
        await td.signal("App.launched")
        td.signal_nowait("App.tick")
        await td.error(ValueError("x"))
        async with td.duration("Job.done"):
            pass
        await td.new_session()
        result = await td.flush()
        tasks = [t.get_name() for t in asyncio.all_tasks()]
        stats = td.stats
    assert "telemetrydeck-flusher" not in tasks
    assert (result.sent, result.pending) == (0, 0)
    assert (stats.enqueued, stats.sent, stats.queue_depth, stats.dropped_total) == (0, 0, 0, 0)
    assert emulator.requests == []
    assert not user_file.exists()


async def test_disabled_client_still_refuses_bad_calls() -> None:
    """A disabled client validates like an enabled one, so tests with telemetry off catch bugs."""
    td = TelemetryClient("app", enabled=False)
    with pytest.raises(InvalidSignalError):
        await td.signal("App.launched", payload={"A.nested": {"b": 1}})
    with pytest.raises(InvalidSignalError):
        await td.error("E.x", category="bad")  # type: ignore[arg-type]  # the wrong value is the test
    await td.aclose()


def test_disabled_signal_nowait_works_without_a_loop() -> None:
    """With telemetry off, signal_nowait() from plain sync code is a silent no-op."""
    td = TelemetryClient("app", enabled=False)
    td.signal_nowait("App.launched")
    assert td.stats.enqueued == 0


@pytest.mark.parametrize(("value", "enabled"), [("1", False), ("true", False), ("0", True)])
def test_telemetrydeck_disabled_variable_turns_any_client_off(
    monkeypatch: pytest.MonkeyPatch, value: str, enabled: bool
) -> None:
    """TELEMETRYDECK_DISABLED is honoured by every client, not only by from_env()."""
    monkeypatch.setenv("TELEMETRYDECK_DISABLED", value)
    assert TelemetryClient("app").enabled is enabled
