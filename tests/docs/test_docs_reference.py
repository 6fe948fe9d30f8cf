"""The reference pages name everything the code offers, so a new option or name is documented."""

from __future__ import annotations

import ast
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Any

import attrs
import pytest

import telemetrydeck_async
from telemetrydeck_async import ClientConfig, RetryPolicy, TelemetryClient
from telemetrydeck_async._config import ENV_VARIABLES

DOCS = Path(__file__).resolve().parents[2] / "docs"
pytestmark = pytest.mark.skipif(not DOCS.is_dir(), reason="no docs/ (an sdist without them)")

# A table row of the configuration page: | `name` | `default` ... |
_ROW = re.compile(r"^\|\s*`(?P<name>\w+)`\s*\|\s*(?P<default>[^|]*)\|", re.MULTILINE)


def _documented_defaults() -> dict[str, str]:
    """Option name to the default cell of its row, from every table of configuration.md."""
    text = (DOCS / "configuration.md").read_text("utf-8")
    return {m["name"]: m["default"].strip() for m in _ROW.finditer(text)}


def _literal(cell: str) -> Any:
    """The Python value of a default cell such as ``\\`100\\```, or a marker if it is prose."""
    code = re.match(r"`([^`]*)`", cell)
    if code is None:
        return _PROSE
    try:
        return ast.literal_eval(code[1])
    except (ValueError, SyntaxError):
        return _PROSE


_PROSE = object()


def _config_defaults() -> dict[str, Any]:
    """The default of each ClientConfig field, as the client applies it."""
    defaults: dict[str, Any] = {}
    for field in attrs.fields(ClientConfig):
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]  # attrs' own marker
            default = default.factory()  # type: ignore[attr-defined]  # checked just above
        defaults[field.name] = default
    return defaults


def test_every_client_option_is_in_the_configuration_tables() -> None:
    """Each TelemetryClient keyword has a row in docs/configuration.md."""
    options = [p for p in inspect.signature(TelemetryClient).parameters if p != "self"]
    documented = _documented_defaults()
    assert [name for name in options if name not in documented] == []


def test_documented_defaults_match_the_code() -> None:
    """Where a row gives a literal default, it is the default ClientConfig applies."""
    documented = _documented_defaults()
    wrong = {}
    for name, default in _config_defaults().items():
        value = _literal(documented.get(name, ""))
        if value is not _PROSE and value != default:
            wrong[name] = (documented[name], default)
    assert wrong == {}


def test_every_retry_policy_field_is_documented_with_its_default() -> None:
    """Each RetryPolicy field has a row with its real default."""
    documented = _documented_defaults()
    for field in attrs.fields(RetryPolicy):
        assert field.name in documented, field.name
        assert _literal(documented[field.name]) == field.default, field.name


def test_every_environment_variable_is_documented() -> None:
    """Each variable from_env() reads, and the opt-out switch, appears on the page."""
    text = (DOCS / "configuration.md").read_text("utf-8")
    for variable in [*ENV_VARIABLES, "TELEMETRYDECK_DISABLED"]:
        assert f"`{variable}`" in text, variable


def test_every_public_name_and_module_is_in_the_api_reference() -> None:
    """docs/api.md renders each name of ``__all__`` and each public submodule."""
    text = (DOCS / "api.md").read_text("utf-8")
    rendered = set(re.findall(r"^::: ([\w.]+)", text, re.MULTILINE))
    modules = {
        f"telemetrydeck_async.{info.name}"
        for info in pkgutil.iter_modules(telemetrydeck_async.__path__)
        if not info.name.startswith("_")
    }
    names = {
        f"telemetrydeck_async.{name}" for name in telemetrydeck_async.__all__ if name[0] != "_"
    }
    # A name defined in a public module is rendered with that module.
    missing = {
        name
        for name in names
        if name not in rendered
        and getattr(telemetrydeck_async, name.rsplit(".", 1)[1]).__module__ not in rendered
    }
    if "<!-- api: remaining-modules -->" in text:  # tools/docs_hooks.py renders the others
        modules = set()
    assert sorted(missing | (modules - rendered)) == []


def test_every_cli_command_has_a_section() -> None:
    """docs/cli.md shows the help of every command (the mkdocs hook fills it in)."""
    from telemetrydeck_async.__main__ import _build_parser

    text = (DOCS / "cli.md").read_text("utf-8")
    shown = set(re.findall(r"<!--\s*cli-help:\s*([\w-]*)\s*-->", text))
    parser = _build_parser()
    commands = {
        name
        for action in parser._actions
        if isinstance(action, type(parser._subparsers._group_actions[0]))  # type: ignore[union-attr]  # argparse offers no public list
        for name in action.choices  # type: ignore[union-attr]  # a _SubParsersAction
    }
    assert sorted(commands - shown) == []
    assert "" in shown, "the top-level help"
