"""Proxies and custom TLS: real servers on loopback, a recording proxy, a throwaway CA.

The client is aimed at ``https://ingest.test:PORT``, a name only the test proxy resolves (to
127.0.0.1), the way a service behind an egress proxy reaches the internet.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from telemetrydeck_async import (
    CertificateError,
    ConfigurationError,
    RetryPolicy,
    TelemetryClient,
)
from telemetrydeck_async._transport import resolve_proxy
from telemetrydeck_async.devserver import IngestEmulator
from tests._proxy import ForwardProxy
from tests.helpers import FAST_RETRY, run_cli

HOST = "ingest.test"
#: Gives up after about a second: for the cases that are meant to fail.
SHORT = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, deadline=1.0)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def tls_emulator(ca: trustme.CA) -> AsyncIterator[IngestEmulator]:
    """The emulator serving HTTPS with a certificate for ingest.test and localhost."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST, "localhost").configure_cert(server_context)
    async with IngestEmulator(port=0, ssl_context=server_context) as emu:
        yield emu


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variable from the machine leaks into a test."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def _client(base_url: str, **options: Any) -> TelemetryClient:
    options.setdefault("retry", FAST_RETRY)
    return TelemetryClient(
        "app",
        namespace="com.example",
        base_url=base_url,
        default_user="u",
        flush_interval=60.0,
        **options,
    )


async def _send_three(td: TelemetryClient) -> None:
    for i in range(3):
        await td.signal("Proxy.case", payload={"Test.id": i})


# ----------------------------------------------------------------------------- the route


@pytest.mark.parametrize(
    ("environ", "explicit", "trust_env", "expected"),
    [
        ({}, None, True, None),
        ({"HTTPS_PROXY": "http://p:1"}, None, True, "http://p:1"),
        ({"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:1"}, None, True, "http://low:1"),
        ({"HTTP_PROXY": "http://p:1"}, None, True, None),  # an https endpoint reads HTTPS_PROXY
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"}, None, True, None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example.com"}, None, True, None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "other.org"}, None, True, "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, None, True, None),
        ({"HTTPS_PROXY": "http://p:1"}, "http://mine:2", True, "http://mine:2"),
        ({"HTTPS_PROXY": "http://p:1"}, None, False, None),
        ({}, "http://mine:2", False, "http://mine:2"),
    ],
)
def test_the_proxy_is_chosen_like_requests_chooses_it(
    environ: dict[str, str], explicit: str | None, trust_env: bool, expected: str | None
) -> None:
    """proxy= wins; then HTTPS_PROXY (lower case first) unless NO_PROXY matches."""
    route = resolve_proxy(
        "https://nom.example.com/v2/", explicit, trust_env=trust_env, environ=environ
    )
    assert (route.url if route is not None else None) == expected


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.8.9.10"])
def test_loopback_is_never_proxied(host: str) -> None:
    """Neither the environment nor proxy= sends a loopback request through a proxy."""
    env = {"HTTPS_PROXY": "http://p:1", "HTTP_PROXY": "http://p:1"}
    for scheme in ("http", "https"):
        url = f"{scheme}://{host}:8787/v2/"
        assert resolve_proxy(url, None, trust_env=True, environ=env) is None
        assert resolve_proxy(url, "http://mine:2", trust_env=True, environ=env) is None


def test_proxy_credentials_are_split_from_the_url() -> None:
    """user:password in the URL become Basic credentials; the URL kept for logs has none."""
    route = resolve_proxy(
        "https://nom.example.com/", "http://us%40er:p%3Ass@proxy:3128", trust_env=True, environ={}
    )
    assert route is not None
    assert route.url == "http://proxy:3128"
    assert route.headers == {
        "Proxy-Authorization": "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    }
    assert "p:ss" not in repr(route)


def test_a_tls_proxy_url_in_the_environment_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """HTTPS_PROXY=https://... is not supported: one WARNING naming the variable, direct route."""
    with caplog.at_level(logging.WARNING, logger="telemetrydeck_async"):
        route = resolve_proxy(
            "https://nom.example.com/", None, trust_env=True, environ={"HTTPS_PROXY": "https://p:1"}
        )
    assert route is None
    assert "HTTPS_PROXY" in caplog.text


def test_under_cgi_the_upper_case_http_proxy_is_ignored() -> None:
    """A client's Proxy: header arrives as HTTP_PROXY in CGI: it must not pick the route."""
    env = {"REQUEST_METHOD": "GET", "HTTP_PROXY": "http://evil:1"}
    assert resolve_proxy("http://nom.example.com/", None, trust_env=True, environ=env) is None


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("https://proxy:3128", "http:// URL"),
        ("proxy:3128", "http:// URL"),
        ("http://proxy", "port"),
        ("http://proxy:3128/path", "path"),
        ("http://proxy:99999", "port"),
        (3128, "proxy URL"),
    ],
)
def test_a_bad_proxy_option_is_refused_without_echoing_it(value: object, words: str) -> None:
    """The message says what to pass; a URL that may hold a password is never repeated."""
    with pytest.raises(ConfigurationError, match=words) as caught:
        TelemetryClient("app", proxy=value)  # type: ignore[arg-type]
    assert caught.value.option == "proxy"
    if isinstance(value, str):
        assert value not in str(caught.value)


def test_the_proxy_password_is_not_in_the_config_repr() -> None:
    """repr(client.config) may end up in logs: the proxy URL (and its password) stays out."""
    td = TelemetryClient("app", proxy="http://user:s3cret@proxy:3128", enabled=False)
    assert "s3cret" not in repr(td.config)


@pytest.mark.parametrize("value", [False, True])
def test_ssl_takes_no_boolean(value: bool) -> None:
    """No flag turns verification off: the message says how to trust a private CA instead."""
    with pytest.raises(ConfigurationError, match="CA bundle") as caught:
        TelemetryClient("app", ssl=value)  # type: ignore[arg-type]
    assert "always verified" in str(caught.value)


def test_a_missing_ca_bundle_fails_at_construction(tmp_path: Path) -> None:
    """ssl= naming a file that is not there fails now, naming the path."""
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigurationError, match=r"nope\.pem"):
        TelemetryClient("app", ssl=missing)


def test_a_context_that_does_not_verify_is_taken_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An SSLContext with CERT_NONE is the caller's explicit choice: allowed, and WARNed."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with caplog.at_level(logging.WARNING, logger="telemetrydeck_async"):
        td = TelemetryClient("app", ssl=context, enabled=False)
    assert td.config.ssl is context
    assert "does not verify" in caplog.text


# ----------------------------------------------------------------------------- real servers


async def test_delivered_over_https_with_the_ca_bundle_path(
    tls_emulator: IngestEmulator, ca_file: str, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """A private CA given as ssl=PATH: the signals arrive over TLS."""
    url = f"https://localhost:{tls_emulator.port}"
    async with _client(url, ssl=ca_file) as td:
        await _send_three(td)
        result = await td.flush(timeout=20)
    assert result.sent == 3
    assert tls_emulator.distinct_ids() == {0, 1, 2}


async def test_without_the_ca_the_signals_are_kept_and_one_error_is_logged(
    tls_emulator: IngestEmulator,
    ca: trustme.CA,
    no_proxy_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An untrusted certificate: one ERROR naming ssl=, nothing dropped, nothing sent."""
    url = f"https://localhost:{tls_emulator.port}"
    with caplog.at_level(logging.WARNING, logger="telemetrydeck_async"):
        td = _client(url)
        async with td:
            await _send_three(td)
            await td.flush(timeout=20)
            await _send_three(td)  # a second batch: still a single ERROR
            await td.flush(timeout=20)
            stats = td.stats
            assert stats.sent == 0
            assert stats.dropped_total == 0
            assert stats.pending == 6  # held: the first batch parked, the rest queued
            assert stats.parked == 3
            assert stats.last_error is not None
            assert stats.last_error.type == CertificateError.__name__
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "ssl=" in errors[0].getMessage()
    assert "probed" in errors[0].getMessage()
    assert tls_emulator.requests == []  # the handshake failed: no request reached the server


async def test_through_the_environment_proxy_with_connect(
    tls_emulator: IngestEmulator, ca_file: str, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY set: the request tunnels through the proxy (CONNECT) and arrives."""
    async with ForwardProxy(hosts={HOST: "127.0.0.1"}) as proxy:
        no_proxy_env.setenv("HTTPS_PROXY", proxy.url)
        async with _client(f"https://{HOST}:{tls_emulator.port}", ssl=ca_file) as td:
            await _send_three(td)
            result = await td.flush(timeout=20)
    assert result.sent == 3
    assert tls_emulator.distinct_ids() == {0, 1, 2}
    assert [(r.method, r.target) for r in proxy.records] == [
        ("CONNECT", f"{HOST}:{tls_emulator.port}")
    ]


async def test_explicit_proxy_with_credentials_wins_over_the_environment(
    tls_emulator: IngestEmulator, ca_file: str, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """proxy= with user:password is used (credentials sent), the HTTPS_PROXY one is not."""
    hosts = {HOST: "127.0.0.1"}
    async with (
        ForwardProxy(hosts=hosts, credentials="svc:pa ss") as chosen,
        ForwardProxy(hosts=hosts) as from_env,
    ):
        no_proxy_env.setenv("HTTPS_PROXY", from_env.url)
        proxy = chosen.url.replace("http://", "http://svc:pa%20ss@")
        async with _client(f"https://{HOST}:{tls_emulator.port}", ssl=ca_file, proxy=proxy) as td:
            await _send_three(td)
            result = await td.flush(timeout=20)
    assert result.sent == 3
    assert from_env.records == []
    assert [r.credentials for r in chosen.records] == ["svc:pa ss"]


async def test_a_proxy_refusing_the_credentials_keeps_retrying_then_reports(
    tls_emulator: IngestEmulator, ca_file: str, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """407 from the proxy is a transport error with the status in stats.last_error."""
    async with ForwardProxy(hosts={HOST: "127.0.0.1"}, credentials="svc:right") as proxy:
        proxy_url = proxy.url.replace("http://", "http://svc:wrong@")
        async with _client(
            f"https://{HOST}:{tls_emulator.port}", ssl=ca_file, proxy=proxy_url, retry=SHORT
        ) as td:
            await td.signal("Proxy.case")
            await td.flush(timeout=20)
            last = td.stats.last_error
    assert last is not None
    assert "407" in last.message
    assert tls_emulator.signals == []


async def test_loopback_endpoint_bypasses_a_configured_proxy(
    emulator: IngestEmulator, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """With HTTP(S)_PROXY and proxy= set, the local emulator is reached directly."""
    async with ForwardProxy() as proxy:
        no_proxy_env.setenv("HTTP_PROXY", proxy.url)
        no_proxy_env.setenv("HTTPS_PROXY", proxy.url)
        async with _client(emulator.base_url, proxy=proxy.url) as td:
            await _send_three(td)
            result = await td.flush(timeout=20)
    assert result.sent == 3
    assert proxy.records == []


def test_ssl_takes_a_directory_of_ca_certificates(tmp_path: Path) -> None:
    """A directory is loaded as a CA path (hashed certificates), like OpenSSL's -CApath."""
    td = TelemetryClient("app", ssl=tmp_path, enabled=False)
    assert isinstance(td.config.ssl, ssl.SSLContext)


def test_ssl_of_another_type_names_what_to_pass() -> None:
    """ssl=3: the message names both accepted kinds and the type given."""
    with pytest.raises(ConfigurationError, match=r"CA bundle path or an ssl\.SSLContext, got int"):
        TelemetryClient("app", ssl=3)  # type: ignore[arg-type]


def test_an_ipv6_proxy_keeps_its_brackets() -> None:
    """http://[fd00::1]:3128 stays a valid URL once the credentials are taken out."""
    route = resolve_proxy(
        "https://nom.example.com/", "http://u:p@[fd00::1]:3128", trust_env=True, environ={}
    )
    assert route is not None
    assert route.url == "http://[fd00::1]:3128"


async def test_the_send_command_takes_a_ca_bundle(
    tls_emulator: IngestEmulator, ca_file: str, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """``send --ssl CA`` delivers over TLS; without it, a non-zero exit naming the certificate."""
    url = f"https://localhost:{tls_emulator.port}"
    common = ["send", "Cli.tls", "--app-id", "A", "--namespace", "com.example", "--base-url", url]
    code, _, err = await run_cli(*common, "--ssl", ca_file)
    assert code == 0, err
    assert len(tls_emulator.signals) == 1
    code, _, err = await run_cli(*common, "--timeout", "3")
    assert code == 1
    assert "CertificateError" in err
    assert len(tls_emulator.signals) == 1


async def test_through_a_proxy_an_untrusted_certificate_keeps_the_signals(
    tls_emulator: IngestEmulator, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """Behind a proxy without the CA (a TLS-inspecting proxy's case): CertificateError, kept."""
    async with ForwardProxy(hosts={HOST: "127.0.0.1"}) as proxy:
        td = _client(f"https://{HOST}:{tls_emulator.port}", proxy=proxy.url)
        async with td:
            await _send_three(td)
            await td.flush(timeout=20)
            stats = td.stats
    assert stats.last_error is not None
    assert stats.last_error.type == CertificateError.__name__
    assert (stats.parked, stats.sent, stats.dropped_total) == (3, 0, 0)
    assert [r.method for r in proxy.records] == ["CONNECT"]
