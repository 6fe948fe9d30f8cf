"""MkDocs hooks: the parts of the site that follow the code and the docs folder by themselves.

* **CLI help.** In a page, a line ``<!-- cli-help: send -->`` becomes the output of
  ``telemetrydeck-async send --help`` (an empty name: the top-level help), so the command-line
  reference always matches the parser. A command that ``docs/cli.md`` does not show is a
  warning, which fails ``mkdocs build --strict``.
* **Public modules.** A line ``<!-- api: remaining-modules -->`` becomes an API reference
  section for each public submodule of the package that the page does not already render, so
  a new module (an integration, say) is documented the moment it exists.
* **Navigation.** A page in ``docs/`` that ``nav`` does not list yet is added to it, before
  the reference pages, under its own title: nobody's new page is left unlinked.
"""

from __future__ import annotations

import argparse
import logging
import os
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the source tree's package

import telemetrydeck_async  # after the path fix
from telemetrydeck_async.__main__ import _build_parser

log = logging.getLogger("mkdocs.hooks.telemetrydeck_async")

_CLI_MARKER = re.compile(r"^<!--\s*cli-help:\s*(?P<command>[\w-]*)\s*-->\s*$", re.MULTILINE)
_MODULES_MARKER = re.compile(r"^<!--\s*api:\s*remaining-modules\s*-->\s*$", re.MULTILINE)
#: The width of the rendered help, whatever the terminal that builds the site.
_COLUMNS = "88"
#: New pages go into the navigation before the first of these (the reference part).
_REFERENCE_PAGES = ("cli.md", "api.md", "contributing.md", "changelog.md")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers by command name (argparse offers no public way to list them)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_help(command: str) -> str:
    """``telemetrydeck-async [command] --help``, as a terminal of ``_COLUMNS`` would show it."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _COLUMNS
    try:
        parser = _build_parser()
        if command:
            parser = _subcommands(parser)[command]
        return parser.format_help()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def public_modules() -> list[str]:
    """The package's public submodules, e.g. ``telemetrydeck_async.devserver``."""
    return sorted(
        f"telemetrydeck_async.{info.name}"
        for info in pkgutil.iter_modules(telemetrydeck_async.__path__)
        if not info.name.startswith("_")
    )


def _nav_files(nav: Any) -> set[str]:
    """Every page path named anywhere in a ``nav`` structure."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_nav_files(value) for value in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_nav_files(item) for item in nav))
    return set()


def on_config(config: Any, **_kwargs: Any) -> Any:
    """Add the pages of ``docs/`` that ``nav`` does not list, before the reference pages."""
    nav = config.get("nav")
    if not isinstance(nav, list):
        return config
    listed = _nav_files(nav)
    docs_dir = Path(config["docs_dir"])
    missing = sorted(
        page.relative_to(docs_dir).as_posix()
        for page in docs_dir.rglob("*.md")
        if page.relative_to(docs_dir).as_posix() not in listed
    )
    if missing:
        at = next(
            (i for i, item in enumerate(nav) if _nav_files(item) & set(_REFERENCE_PAGES)),
            len(nav),
        )
        nav[at:at] = missing
        log.info("added to the navigation: %s", ", ".join(missing))
    return config


def _cli_markers(markdown: str, page: Any) -> str:
    commands = _subcommands(_build_parser())
    if page.file.src_uri == "cli.md":
        shown = {match["command"] for match in _CLI_MARKER.finditer(markdown)}
        for missing in sorted(set(commands) - shown):
            log.warning(
                "cli.md: the %r command is not documented (add <!-- cli-help: %s -->)",
                missing,
                missing,
            )

    def render(match: re.Match[str]) -> str:
        command = match["command"]
        if command and command not in commands:
            log.warning("%s: there is no %r command", page.file.src_uri, command)
            return match[0]
        line = f"$ telemetrydeck-async {command} --help".replace("  ", " ")
        return f"```text\n{line}\n{cli_help(command)}```"

    return _CLI_MARKER.sub(render, markdown)


def _module_sections(markdown: str) -> str:
    rendered = set(re.findall(r"^::: ([\w.]+)", markdown, re.MULTILINE))
    sections = [
        f"## `{module}`\n\n::: {module}\n    options:\n"
        "      show_root_heading: false\n      show_root_toc_entry: false\n"
        for module in public_modules()
        if module not in rendered
    ]
    return _MODULES_MARKER.sub(lambda _match: "\n".join(sections), markdown)


def on_page_markdown(markdown: str, page: Any, **_kwargs: Any) -> str:
    """Fill in the ``cli-help`` and ``api: remaining-modules`` markers of a page."""
    if _CLI_MARKER.search(markdown):
        markdown = _cli_markers(markdown, page)
    if _MODULES_MARKER.search(markdown):
        markdown = _module_sections(markdown)
    return markdown
