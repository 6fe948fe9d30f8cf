"""The command line, run as a user runs it: real subprocesses against a real emulator."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from telemetrydeck_async import RetryPolicy, TelemetryClient
from telemetrydeck_async.devserver import IngestEmulator
from tests.helpers import free_port, run_cli, sdk_parameters, sha256_hex


async def test_demo_delivers_every_signal_and_exits_zero() -> None:
    """The demo sends its signals through the emulator, retries the injected 503s, exits 0."""
    code, out, err = await run_cli("demo", "--count", "1200")
    assert code == 0, err
    assert "all 1200 signals delivered" in out
    assert "signals received" in out
    assert "requests retried" in out


async def test_send_delivers_one_signal(emulator: IngestEmulator) -> None:
    """send posts exactly one signal with the given type, payload, value and hashed user."""
    code, out, err = await run_cli(
        "send",
        "Cli.used",
        "--app-id",
        "APP",
        "--namespace",
        "com.example",
        "--user",
        "bob",
        "--payload",
        "Cli.count=3",
        "--payload",
        "Cli.name=x",
        "--payload",
        "Cli.ok=true",
        "--float-value",
        "2.5",
        "--test-mode",
        "--base-url",
        emulator.base_url,
    )
    assert code == 0, err
    assert "delivered" in out
    (signal,) = emulator.signals
    assert signal["type"] == "Cli.used"
    assert signal["clientUser"] == sha256_hex("bob")
    assert signal["payload"] == {
        "Cli.count": 3,
        "Cli.name": "x",
        "Cli.ok": True,
        **sdk_parameters(),
    }
    assert signal["floatValue"] == 2.5
    assert signal["isTestMode"] is True


async def test_send_exits_nonzero_with_a_reason_when_refused(emulator: IngestEmulator) -> None:
    """When the server refuses the signal, send exits 1 and says why in one line."""
    emulator.faults.status_always = 400
    code, _out, err = await run_cli(
        "send", "Cli.used", "--app-id", "APP", "--base-url", emulator.base_url
    )
    assert code == 1
    assert "not delivered (rejected)" in err


async def test_send_says_when_proxy_and_ssl_were_not_used(
    emulator: IngestEmulator, tmp_path: Path
) -> None:
    """--proxy to a loopback --base-url and --ssl to an http:// one test nothing: send says so.

    The proxy port is closed: the signal is delivered only because loopback is never proxied.
    """
    trustme = pytest.importorskip("trustme")
    ca_bundle = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_bundle))
    args = ("send", "Cli.used", "--app-id", "APP", "--base-url", emulator.base_url)
    code, out, err = await run_cli(
        *args, "--proxy", f"http://127.0.0.1:{free_port()}", "--ssl", str(ca_bundle)
    )
    assert code == 0, err
    assert "delivered" in out
    assert "--proxy is not used" in err
    assert "--ssl is not used" in err
    code, out, err = await run_cli(*args)
    assert code == 0, err
    assert "not used" not in err
    assert len(emulator.signals) == 2


async def test_send_with_invalid_arguments_exits_2() -> None:
    """A bad signal type is reported as an error before anything is sent."""
    code, _out, err = await run_cli(
        "send", "TelemetryDeck.bad", "--app-id", "APP", "--base-url", "http://127.0.0.1:9"
    )
    assert code == 2
    assert "type" in err


async def _fill_spool(directory: Path, count: int, port: int | None = None) -> None:
    """Spool ``count`` signals by closing a client whose endpoint (on ``port``) is down."""
    port = free_port() if port is None else port
    td = TelemetryClient(
        "APP",
        namespace="com.example",
        base_url=f"http://127.0.0.1:{port}",
        default_user="u",
        spool_dir=str(directory),
        retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.02, deadline=0.2),
    )
    for i in range(count):
        await td.signal("Cli.spooled", payload={"Test.id": i})
    await td.aclose(timeout=3)
    assert td.stats.spooled == count


async def test_spool_status_reports_what_the_directory_holds(tmp_path: Path) -> None:
    """spool status prints the record count and the time range of a spool directory."""
    await _fill_spool(tmp_path, 40)
    code, out, err = await run_cli("spool", "status", str(tmp_path))
    assert code == 0, err
    assert re.search(r"records \(signals\)\s+40$", out, re.MULTILINE)
    assert "oldest receivedAt" in out


async def test_spool_status_of_a_directory_without_a_spool_fails(tmp_path: Path) -> None:
    """Pointing spool status at an empty directory is an error, and creates nothing."""
    code, _out, err = await run_cli("spool", "status", str(tmp_path / "none"))
    assert code == 1
    assert "no spool" in err
    assert not (tmp_path / "none").exists()


async def test_spool_drain_sends_everything_and_exits_zero(tmp_path: Path) -> None:
    """spool drain delivers every spooled signal and leaves the spool empty."""
    port = free_port()
    await _fill_spool(tmp_path, 250, port)
    async with IngestEmulator(port=port) as emulator:
        code, out, err = await run_cli(
            "spool",
            "drain",
            str(tmp_path),
            "--app-id",
            "APP",
            "--namespace",
            "com.example",
            "--base-url",
            emulator.base_url,
            "--timeout",
            "60",
        )
    assert code == 0, err
    assert "sent 250 signal(s)" in out
    assert emulator.distinct_ids() == set(range(250))


async def test_spool_drain_exits_nonzero_when_signals_are_left(tmp_path: Path) -> None:
    """With the endpoint down, drain gives up after its timeout and says what is left."""
    port = free_port()
    await _fill_spool(tmp_path, 10, port)
    code, _out, err = await run_cli(
        "spool",
        "drain",
        str(tmp_path),
        "--app-id",
        "APP",
        "--namespace",
        "com.example",
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--timeout",
        "1",
    )
    assert code == 1
    assert "10 signal(s) could not be sent" in err
