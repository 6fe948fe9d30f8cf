"""The command line, run as a user runs it: real subprocesses against a real emulator."""

from __future__ import annotations

import asyncio
import sys

from telemetrydeck_async.devserver import IngestEmulator

from .conftest import sdk_parameters, sha256_hex


async def run_cli(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run ``python -m telemetrydeck_async ARGS`` and return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "telemetrydeck_async",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


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


async def test_send_with_invalid_arguments_exits_2() -> None:
    """A bad signal type is reported as an error before anything is sent."""
    code, _out, err = await run_cli(
        "send", "TelemetryDeck.bad", "--app-id", "APP", "--base-url", "http://127.0.0.1:9"
    )
    assert code == 2
    assert "type" in err
