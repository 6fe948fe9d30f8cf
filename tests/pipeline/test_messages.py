"""Messages a new user meets: each names the problem, what was given, and the way out."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from telemetrydeck_async import ConfigurationError, InvalidSignalError, TelemetryClient
from telemetrydeck_async.devserver import IngestEmulator
from tests.helpers import ClientFactory, run_cli


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (12345, ["must be a str", "int 12345"]),
        (None, ["must be a str", "NoneType None"]),
        (b"abc", ["must be a str", "bytes"]),
        ("  ", ["non-empty", "empty str"]),
    ],
)
def test_a_wrong_app_id_says_what_was_given(value: object, words: list[str]) -> None:
    """TelemetryClient(12345): the message says a str is needed and shows the int."""
    with pytest.raises(ConfigurationError) as caught:
        TelemetryClient(value)  # type: ignore[arg-type]
    assert caught.value.option == "app_id"
    for word in words:
        assert word in str(caught.value)


async def test_an_oversized_signal_names_the_limit_and_two_ways_out(
    make_client: ClientFactory,
) -> None:
    """The message gives the size, the limit, and both fixes; nothing is enqueued."""
    async with make_client(max_batch_bytes=4096) as td:
        with pytest.raises(InvalidSignalError) as caught:
            await td.signal("Big.one", payload={"Blob.text": "x" * 5000})
        message = str(caught.value)
        assert "4096 bytes" in message
        assert "send less" in message
        assert "raise max_batch_bytes" in message
        assert td.stats.enqueued == 0


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("https://nom.example.com/v2/", False),
        ("https://nom.example.com/v2/namespace/com.example/", False),
        ("https://nom.example.com/v2", False),
        ("https://gateway.example.com/telemetry", True),
    ],
)
def test_a_base_url_with_a_path(url: str, accepted: bool) -> None:
    """The API path pasted in is refused with the root to use; another path is a prefix."""
    if accepted:
        td = TelemetryClient("app", namespace="com.example", base_url=url, enabled=False)
        assert td.config.endpoint_url == f"{url}/v2/namespace/com.example/"
        return
    with pytest.raises(ConfigurationError) as caught:
        TelemetryClient("app", base_url=url)
    assert "server root" in str(caught.value)
    assert "'https://nom.example.com'" in str(caught.value)


def test_a_spool_dir_that_is_a_file_fails_at_construction(tmp_path: Path) -> None:
    """Certain at construction: the path exists and is a file; the message names it."""
    path = tmp_path / "spool"
    path.write_text("not a directory")
    with pytest.raises(ConfigurationError) as caught:
        TelemetryClient("app", spool_dir=str(path))
    assert caught.value.option == "spool_dir"
    assert str(path) in str(caught.value)
    assert "not a directory" in str(caught.value)


async def test_an_unusable_spool_dir_is_one_warning_without_traceback(
    make_client: ClientFactory,
    emulator: IngestEmulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found only when the spool opens: one WARNING naming path and fix, last_error set."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    spool_dir = str(blocker / "spool")  # under a file: cannot be created
    caplog.set_level(logging.DEBUG, logger="telemetrydeck_async")
    async with make_client(spool_dir=spool_dir) as td:
        await td.signal("Still.sent")
        result = await td.flush(timeout=20)
        last = td.stats.last_error
    assert result.sent == 1  # memory-only, still delivering
    assert last is not None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert spool_dir in message
    assert "writable" in message
    assert warnings[0].exc_info is None


def test_none_payload_values_are_documented_where_users_look() -> None:
    """The None-is-skipped rule is in the README payload line and the configuration page."""
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text("utf-8")
    assert '`{"a": None}`' in readme
    docs = root / "docs"
    if docs.is_dir():  # an sdist may ship without the docs site
        assert '`{"a": None}`' in (docs / "configuration.md").read_text("utf-8")


def test_every_devserver_flag_has_a_help_line() -> None:
    """``devserver --help`` explains each fault flag, one per FaultPlan field."""
    import argparse

    import attrs

    from telemetrydeck_async.devserver import FaultPlan, add_devserver_arguments

    parser = argparse.ArgumentParser()
    add_devserver_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    for field in attrs.fields(FaultPlan):
        assert helps.get(field.name), f"--{field.name.replace('_', '-')} has no help line"
    text = parser.format_help()
    assert "--drop-after-accept-next" in text
    assert "duplicates" in text


async def test_the_demo_shows_the_outage_and_each_retry_as_it_happens() -> None:
    """One line per retry with its wait, the outage's start and end; never "0.0 s"."""
    code, out, err = await run_cli("demo", "--count", "1000", "--fail-next", "2", "--outage", "0.5")
    assert code == 0, err
    lines = out.splitlines()
    retries = [line for line in lines if "retry in" in line]
    assert len(retries) >= 2  # at least the two injected 503s
    assert all(re.search(r"retry in (\d+ ms|\d+\.\d s|under 1 ms)$", line) for line in retries)
    begins = next(i for i, line in enumerate(lines) if "outage begins" in line)
    ends = next(i for i, line in enumerate(lines) if "outage over" in line)
    assert begins < ends
    assert any("retry in" in line for line in lines[begins:ends])  # refused during the outage
    assert "0.0 s" not in out
    assert "all 1000 signals delivered" in out
    assert "Traceback" not in out + err


def test_troubleshooting_explains_every_drop_reason() -> None:
    """Each reason in DROP_REASONS has a row saying what to change."""
    from telemetrydeck_async import DROP_REASONS

    page = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"
    if not page.is_file():
        pytest.skip("no docs/ (an sdist without them)")
    rows = re.findall(r"^\| `(\w+)` \|", page.read_text("utf-8"), re.MULTILINE)
    assert sorted(rows) == sorted(DROP_REASONS)


@pytest.mark.parametrize("url", ["http://[::1", "https://example.com:port", "https://h:99999"])
def test_a_malformed_base_url_names_the_option_and_an_example(url: str) -> None:
    """A URL that cannot be parsed is a ConfigurationError like any other bad base_url."""
    with pytest.raises(ConfigurationError) as caught:
        TelemetryClient("app", base_url=url)
    assert caught.value.option == "base_url"
    assert "is not a valid URL" in str(caught.value)
    assert "https://nom.telemetrydeck.com" in str(caught.value)
