"""Tests for the local ingest emulator, against a real server on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal as signal_module
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from telemetrydeck_async.devserver import (
    EMULATOR_KEY,
    FaultPlan,
    IngestEmulator,
    add_devserver_arguments,
    build_app,
    devserver_main,
    run_devserver,
)
from tests.helpers import free_port

USER = hashlib.sha256(b"user").hexdigest()
NS_PATH = "/v2/namespace/com.example/"
REPO_ROOT = str(Path(__file__).resolve().parents[2])
_MISSING = object()


def make_signal(n: int = 0, **overrides: Any) -> dict[str, Any]:
    """Return a valid signal tagged with payload ``Test.id = n``; an override of
    ``_MISSING`` removes that field."""
    sig: dict[str, Any] = {
        "appID": "00000000-0000-0000-0000-000000000001",
        "clientUser": USER,
        "type": "App.launched",
        "sessionID": "session-1",
        "payload": {"Test.id": n},
    }
    sig.update(overrides)
    return {k: v for k, v in sig.items() if v is not _MISSING}


@pytest.fixture
async def emu() -> AsyncIterator[IngestEmulator]:
    """An emulator on a free loopback port."""
    async with IngestEmulator() as emulator:
        yield emulator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client session."""
    async with aiohttp.ClientSession() as s:
        yield s


async def post(
    session: aiohttp.ClientSession, emu: IngestEmulator, body: Any, path: str = NS_PATH
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """POST ``body`` as JSON and return (status, decoded JSON body, response)."""
    async with session.post(emu.base_url + path, json=body) as resp:
        return resp.status, await resp.json(), resp


# --------------------------------------------------------------------------- accepting


async def test_valid_batch_is_accepted_on_namespaced_url(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """A valid batch POSTed to /v2/namespace/{ns}/ is answered 200 and recorded."""
    batch = [make_signal(1), make_signal(2)]
    status, body, _ = await post(session, emu, batch)
    assert (status, body) == (200, {"accepted": 2})
    assert emu.signals == batch
    assert emu.batches == [batch]
    assert emu.namespaces == ["com.example"]


async def test_valid_batch_is_accepted_on_legacy_url(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """A valid batch POSTed to /v2/ is accepted and recorded with namespace None."""
    status, body, _ = await post(session, emu, [make_signal(1)], path="/v2/")
    assert (status, body) == (200, {"accepted": 1})
    assert emu.namespaces == [None]
    assert len(emu.signals) == 1


async def test_all_optional_fields_are_accepted(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """Every optional field in its allowed form passes validation."""
    sig = make_signal(
        isTestMode=True,
        floatValue=3,
        receivedAt="2024-05-01T12:30:00.123Z",
        payload={"a": "x", "b": 1, "c": 2.5, "d": False},
    )
    status, _, _ = await post(session, emu, [sig, make_signal(floatValue=-0.5)])
    assert status == 200


async def test_empty_batch_is_accepted(emu: IngestEmulator, session: aiohttp.ClientSession) -> None:
    """An empty array is a valid (if pointless) batch."""
    status, body, _ = await post(session, emu, [])
    assert (status, body) == (200, {"accepted": 0})


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        pytest.param({"appID": _MISSING}, "appID", id="appID-missing"),
        pytest.param({"appID": ""}, "appID", id="appID-empty"),
        pytest.param({"appID": 7}, "appID", id="appID-not-string"),
        pytest.param({"clientUser": _MISSING}, "clientUser", id="clientUser-missing"),
        pytest.param({"clientUser": "user-42"}, "clientUser", id="clientUser-raw-id"),
        pytest.param({"clientUser": USER.upper()}, "clientUser", id="clientUser-uppercase"),
        pytest.param({"clientUser": USER[:-1]}, "clientUser", id="clientUser-63-chars"),
        pytest.param({"clientUser": USER + "\n"}, "clientUser", id="clientUser-trailing-newline"),
        pytest.param({"type": _MISSING}, "type", id="type-missing"),
        pytest.param({"type": ""}, "type", id="type-empty"),
        pytest.param({"sessionID": 5}, "sessionID", id="sessionID-not-string"),
        pytest.param({"isTestMode": "true"}, "isTestMode", id="isTestMode-string"),
        pytest.param({"floatValue": "1.5"}, "floatValue", id="floatValue-string"),
        pytest.param({"floatValue": True}, "floatValue", id="floatValue-bool"),
        pytest.param({"floatValue": float("inf")}, "floatValue", id="floatValue-infinite"),
        pytest.param({"floatValue": float("nan")}, "floatValue", id="floatValue-nan"),
        pytest.param({"payload": ["a"]}, "payload", id="payload-array"),
        pytest.param({"payload": {"a": {"b": 1}}}, "payload", id="payload-nested-object"),
        pytest.param({"payload": {"a": [1]}}, "payload", id="payload-array-value"),
        pytest.param({"payload": {"a": None}}, "payload", id="payload-null-value"),
        pytest.param({"receivedAt": "yesterday"}, "receivedAt", id="receivedAt-unparseable"),
        pytest.param({"receivedAt": 1714566600}, "receivedAt", id="receivedAt-number"),
        pytest.param({"count": 1}, "count", id="unknown-field"),
    ],
)
async def test_invalid_signal_is_refused_naming_the_field(
    emu: IngestEmulator, session: aiohttp.ClientSession, overrides: dict[str, Any], field: str
) -> None:
    """A signal breaking one contract rule gets 400 naming its index and field; nothing is kept."""
    status, body, _ = await post(session, emu, [make_signal(0), make_signal(1, **overrides)])
    assert status == 400
    assert body["signal"] == 1
    assert body["field"] == field
    assert emu.signals == []
    assert emu.batches == []


async def test_refusal_does_not_echo_the_raw_user_id(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """The 400 for an unhashed clientUser does not repeat the raw id."""
    _, body, _ = await post(session, emu, [make_signal(clientUser="alice@example.com")])
    assert "alice" not in str(body)


async def test_non_object_signal_is_refused(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """An array element that is not an object gets 400 naming its index."""
    status, body, _ = await post(session, emu, [make_signal(), "App.launched"])
    assert status == 400
    assert body["signal"] == 1


async def test_non_array_body_is_refused(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """A single signal object instead of an array gets 400."""
    status, body, _ = await post(session, emu, make_signal())
    assert status == 400
    assert "array" in body["error"]


async def test_invalid_json_is_refused(emu: IngestEmulator, session: aiohttp.ClientSession) -> None:
    """A body that is not JSON gets 400."""
    headers = {"Content-Type": "application/json"}
    async with session.post(emu.base_url + NS_PATH, data=b"[{", headers=headers) as resp:
        assert resp.status == 400
        assert "JSON" in (await resp.json())["error"]


async def test_wrong_content_type_is_refused_with_415(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """A body not labelled application/json gets 415."""
    headers = {"Content-Type": "text/plain"}
    async with session.post(emu.base_url + NS_PATH, data=b"[]", headers=headers) as resp:
        assert resp.status == 415


async def test_charset_parameter_is_allowed_in_content_type(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """`application/json; charset=utf-8`, as the SDKs send it, is accepted."""
    headers = {"Content-Type": "application/json; charset=utf-8"}
    async with session.post(emu.base_url + NS_PATH, data=b"[]", headers=headers) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("namespace", ["bad~ns", "with%20space", "caf%C3%A9"])
async def test_bad_namespace_is_404(
    emu: IngestEmulator, session: aiohttp.ClientSession, namespace: str
) -> None:
    """A namespace outside [A-Za-z0-9._-]+ gets 404 and nothing is recorded."""
    url = yarl.URL(f"{emu.base_url}/v2/namespace/{namespace}/", encoded=True)
    async with session.post(url, json=[make_signal()]) as resp:
        assert resp.status == 404
    assert emu.signals == []
    assert emu.requests[0].status == 404


# --------------------------------------------------------------------------- faults


async def test_fail_next_answers_fail_status_with_retry_after(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """fail_next=K fails the next K requests with a Retry-After header, then recovers."""
    emu.faults = FaultPlan(fail_next=2, retry_after="2")
    for _ in range(2):
        status, _, resp = await post(session, emu, [make_signal()])
        assert status == 503
        assert resp.headers["Retry-After"] == "2"
    status, _, resp = await post(session, emu, [make_signal()])
    assert status == 200
    assert "Retry-After" not in resp.headers
    assert len(emu.signals) == 1
    assert emu.faults.fail_next == 0


async def test_fail_next_uses_fail_status(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """Injected failures use the configured fail_status."""
    emu.faults.fail_status = 429
    emu.faults.fail_next = 1
    status, _, _ = await post(session, emu, [make_signal()])
    assert status == 429


async def test_fail_fraction_fails_roughly_that_share(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """fail_fraction=0.5 fails about half of the requests."""
    emu.faults = FaultPlan(fail_fraction=0.5, seed=7)
    statuses = [(await post(session, emu, [make_signal(i)]))[0] for i in range(100)]
    assert 25 <= statuses.count(503) <= 75
    assert statuses.count(503) + statuses.count(200) == 100


async def test_fail_fraction_is_reproducible_with_a_seed(session: aiohttp.ClientSession) -> None:
    """Two emulators with the same seed fail the same requests."""
    runs = []
    for _ in range(2):
        async with IngestEmulator(faults=FaultPlan(fail_fraction=0.3, seed=42)) as emu:
            runs.append([(await post(session, emu, [make_signal()]))[0] for _ in range(20)])
    assert runs[0] == runs[1]


async def test_delay_holds_every_answer(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """delay makes the emulator wait at least that long before answering."""
    emu.faults.delay = 0.2
    started = time.monotonic()
    status, _, _ = await post(session, emu, [make_signal()])
    assert status == 200
    assert time.monotonic() - started >= 0.2


async def test_reset_next_breaks_the_connection_and_records_nothing(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """reset_next makes the client see a connection error; no signal is recorded."""
    emu.faults.reset_next = 1
    with pytest.raises(aiohttp.ClientError):
        await post(session, emu, [make_signal()])
    assert emu.signals == []
    assert emu.requests[0].status is None
    assert emu.requests[0].fault == "reset_next"
    status, _, _ = await post(session, emu, [make_signal()])
    assert status == 200


async def test_drop_after_accept_next_records_but_never_answers(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """drop_after_accept_next records the signals, then the client sees a connection error."""
    emu.faults.drop_after_accept_next = 1
    with pytest.raises(aiohttp.ClientError):
        await post(session, emu, [make_signal(1)])
    assert len(emu.signals) == 1
    assert emu.requests[0].status is None
    status, _, _ = await post(session, emu, [make_signal(1)])  # the client's resend
    assert status == 200
    assert emu.duplicates() == 1


async def test_max_body_bytes_answers_413(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """A body above max_body_bytes gets 413 and nothing is recorded; a small one passes."""
    emu.faults.max_body_bytes = 300
    status, _, _ = await post(session, emu, [make_signal(i) for i in range(5)])
    assert status == 413
    assert emu.signals == []
    status, _, _ = await post(session, emu, [make_signal()])
    assert status == 200


async def test_max_body_bytes_applies_to_chunked_bodies(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """A chunked body (no Content-Length) is also cut off at max_body_bytes."""
    emu.faults.max_body_bytes = 100

    async def chunks() -> AsyncIterator[bytes]:
        yield b"["
        for _ in range(20):
            yield b'"' + b"x" * 20 + b'",'
        yield b'"x"]'

    headers = {"Content-Type": "application/json"}
    async with session.post(emu.base_url + NS_PATH, data=chunks(), headers=headers) as resp:
        assert resp.status == 413


async def test_reject_marker_refuses_the_request_naming_each_signal(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """Signals carrying the reject marker key get the request 400 naming their indexes."""
    emu.faults.reject_marker = "Test.poison"
    batch = [
        make_signal(0),
        make_signal(1, payload={"Test.poison": True}),
        make_signal(2),
        make_signal(3, payload={"Test.poison": "yes"}),
    ]
    status, body, _ = await post(session, emu, batch)
    assert status == 400
    assert body["signal"] == 1
    assert body["field"] == "payload"
    assert [e["signal"] for e in body["errors"]] == [1, 3]
    assert emu.signals == []


async def test_status_always_answers_every_request(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """status_always answers every ingest request with that status."""
    emu.faults.status_always = 401
    statuses = [(await post(session, emu, [make_signal()]))[0] for _ in range(3)]
    assert statuses == [401, 401, 401]
    assert emu.signals == []


async def test_fault_plan_refuses_invalid_values() -> None:
    """Assigning an invalid value to a fault field raises ValueError."""
    plan = FaultPlan()
    with pytest.raises(ValueError, match="fail_next"):
        plan.fail_next = -1
    with pytest.raises(ValueError, match="fail_fraction"):
        FaultPlan(fail_fraction=1.5)


# --------------------------------------------------------------------------- queries


async def test_distinct_ids_and_duplicates_are_counted(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """distinct_ids(), duplicates() and count_by_type() reflect the accepted signals."""
    await post(session, emu, [make_signal(1), make_signal(2)])
    await post(session, emu, [make_signal(2, type="B"), make_signal(3, type="B")])
    assert emu.distinct_ids() == {1, 2, 3}
    assert emu.duplicates() == 1
    assert emu.count_by_type() == {"App.launched": 2, "B": 2}


async def test_requests_are_recorded_with_their_outcome(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """Every ingest request is recorded with path, status, signal count, size and headers."""
    await post(session, emu, [make_signal(1), make_signal(2)])
    await post(session, emu, [make_signal(clientUser="raw")], path="/v2/")
    first, second = emu.requests
    assert (first.path, first.status, first.n_signals) == (NS_PATH, 200, 2)
    assert first.body_bytes > 0
    assert first.headers["Content-Type"] == "application/json"
    assert (second.path, second.status) == ("/v2/", 400)


async def test_signals_route_lists_accepted_signals(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """GET /signals returns the accepted signals as a JSON list."""
    batch = [make_signal(1), make_signal(2)]
    await post(session, emu, batch)
    async with session.get(emu.base_url + "/signals") as resp:
        assert await resp.json() == batch


async def test_stats_route_reports_counters(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """GET /stats reports signals, batches, requests, distinct, duplicates and by_type."""
    await post(session, emu, [make_signal(1), make_signal(1)])
    await post(session, emu, {"not": "an array"})
    async with session.get(emu.base_url + "/stats") as resp:
        stats = await resp.json()
    assert stats == {
        "signals": 2,
        "batches": 1,
        "requests": 2,
        "distinct": 1,
        "duplicates": 1,
        "by_type": {"App.launched": 2},
    }


async def test_faults_route_updates_the_live_plan(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """POST /_faults changes the live plan and answers the whole plan."""
    plan = emu.faults
    async with session.post(emu.base_url + "/_faults", json={"fail_next": 1}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["fail_next"] == 1
    assert body["fail_status"] == 503
    assert emu.faults is plan
    assert plan.fail_next == 1
    status, _, _ = await post(session, emu, [make_signal()])
    assert status == 503


@pytest.mark.parametrize(
    "changes",
    [{"no_such_fault": 1}, {"fail_next": -1}, {"fail_fraction": 2}, {"delay": "slow"}, [1]],
)
async def test_faults_route_refuses_invalid_changes(
    emu: IngestEmulator, session: aiohttp.ClientSession, changes: Any
) -> None:
    """POST /_faults with an unknown field or a bad value gets 400 and changes nothing."""
    async with session.post(emu.base_url + "/_faults", json=changes) as resp:
        assert resp.status == 400
    assert emu.faults == FaultPlan()


async def test_faults_route_changes_all_fields_or_none(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """A /_faults update with one bad field does not apply the good ones."""
    changes = {"fail_next": 3, "fail_fraction": 7}
    async with session.post(emu.base_url + "/_faults", json=changes) as resp:
        assert resp.status == 400
    assert emu.faults.fail_next == 0


async def test_control_routes_ignore_faults(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """Faults hit ingest routes only, so a broken emulator can still be reconfigured."""
    emu.faults.status_always = 500
    async with session.post(emu.base_url + "/_faults", json={"status_always": None}) as resp:
        assert resp.status == 200
    status, _, _ = await post(session, emu, [make_signal()])
    assert status == 200


async def test_reset_route_clears_recorded_data_but_keeps_faults(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """POST /_reset forgets signals, batches and requests; the fault plan stays."""
    await post(session, emu, [make_signal()])
    emu.faults.fail_next = 5
    async with session.post(emu.base_url + "/_reset") as resp:
        assert resp.status == 200
    assert (emu.signals, emu.batches, emu.namespaces, emu.requests) == ([], [], [], [])
    assert emu.faults.fail_next == 5


async def test_wait_for_signals_returns_when_enough_arrived(
    emu: IngestEmulator, session: aiohttp.ClientSession
) -> None:
    """wait_for_signals(n) wakes up once n signals were accepted."""
    waiter = asyncio.create_task(emu.wait_for_signals(3, timeout=5.0))
    await post(session, emu, [make_signal(1), make_signal(2)])
    await asyncio.sleep(0)
    assert not waiter.done()
    await post(session, emu, [make_signal(3)])
    assert await waiter is True


async def test_wait_for_signals_returns_false_on_timeout(emu: IngestEmulator) -> None:
    """wait_for_signals gives up with False after the timeout."""
    assert await emu.wait_for_signals(1, timeout=0.05) is False


# --------------------------------------------------------------------------- lifecycle


async def test_restart_on_the_same_fixed_port_simulates_an_outage() -> None:
    """An emulator on a fixed port can be stopped and a new one started on that port."""
    port = free_port()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with IngestEmulator(port=port) as first:
            assert first.port == port
            assert (await post(session, first, [make_signal(1)]))[0] == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(session, first, [make_signal(2)])
        async with IngestEmulator(port=port) as second:
            assert (await post(session, second, [make_signal(2)]))[0] == 200
            assert second.distinct_ids() == {2}


async def test_base_url_uses_the_real_port(emu: IngestEmulator) -> None:
    """With port=0, base_url carries the port actually bound."""
    assert emu.port > 0
    assert emu.base_url == f"http://127.0.0.1:{emu.port}"


async def test_non_loopback_host_is_refused() -> None:
    """The emulator and run_devserver refuse to bind a non-loopback address."""
    with pytest.raises(ValueError, match="loopback"):
        IngestEmulator(host="0.0.0.0")
    with pytest.raises(ValueError, match="loopback"):
        run_devserver(host="192.0.2.1", port=0)


async def test_echo_prints_one_line_per_accepted_batch(
    session: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """With echo=True each accepted batch is one stdout line with namespace, count and types."""
    async with IngestEmulator(echo=True) as emu:
        batch = [make_signal(1, type="A"), make_signal(2, type="A"), make_signal(3, type="B")]
        await post(session, emu, batch)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert "com.example" in lines[0]
    assert "3 signals" in lines[0]
    assert '"A": 2' in lines[0]
    assert '"B": 1' in lines[0]


def test_build_app_exposes_its_emulator() -> None:
    """build_app() serves a (new) emulator kept under EMULATOR_KEY."""
    emu = IngestEmulator()
    assert build_app(emu)[EMULATOR_KEY] is emu
    assert isinstance(build_app()[EMULATOR_KEY], IngestEmulator)


def test_devserver_arguments_build_the_fault_plan() -> None:
    """add_devserver_arguments parses --host, --port and every fault flag."""
    parser = argparse.ArgumentParser()
    add_devserver_arguments(parser)
    args = parser.parse_args(
        ["--port", "0", "--fail-next", "2", "--retry-after", "3", "--status-always", "401"]
    )
    assert (args.host, args.port, args.fail_next, args.retry_after) == ("127.0.0.1", 0, 2, "3")
    assert args.status_always == 401
    assert args.drop_after_accept_next == 0


def test_devserver_main_refuses_a_bad_fault_value(capsys: pytest.CaptureFixture[str]) -> None:
    """devserver_main returns 2 with a message for an invalid fault value."""
    parser = argparse.ArgumentParser()
    add_devserver_arguments(parser)
    assert devserver_main(parser.parse_args(["--fail-fraction", "3"])) == 2
    assert "fail_fraction" in capsys.readouterr().err


async def test_run_devserver_serves_until_sigterm(session: aiohttp.ClientSession) -> None:
    """run_devserver prints its URL first, serves, and exits cleanly on SIGTERM."""
    code = "from telemetrydeck_async.devserver import run_devserver; run_devserver(port=0)"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    try:
        first = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        prefix = "telemetrydeck-async ingest emulator listening on "
        assert first.startswith(prefix)
        url = first[len(prefix) :].strip()
        async with session.post(url + NS_PATH, json=[make_signal()]) as resp:
            assert resp.status == 200
        proc.send_signal(signal_module.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
