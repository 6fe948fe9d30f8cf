"""MkDocs hooks: the command-line reference is generated from the real argument parser.

In ``docs/cli.md``, a line ``<!-- cli-help: send -->`` becomes the output of
``telemetrydeck-async send --help`` (an empty name: the top-level help), so the page always
matches the code. A command the page does not show is a warning, which fails
``mkdocs build --strict``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the source tree's package

from telemetrydeck_async.__main__ import _build_parser  # after the path fix

log = logging.getLogger("mkdocs.hooks.cli_help")

_MARKER = re.compile(r"^<!--\s*cli-help:\s*(?P<command>[\w-]*)\s*-->\s*$", re.MULTILINE)
#: The width of the rendered help, whatever the terminal that builds the site.
_COLUMNS = "88"


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


def on_page_markdown(markdown: str, page: Any, **_kwargs: Any) -> str:
    """Replace each ``<!-- cli-help: NAME -->`` with that command's help text."""
    if not _MARKER.search(markdown):
        return markdown
    commands = _subcommands(_build_parser())
    shown = {match["command"] for match in _MARKER.finditer(markdown)}
    for missing in sorted(set(commands) - shown):
        log.warning(
            "%s: the %r command is not documented (add <!-- cli-help: %s -->)",
            page.file.src_uri,
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

    return _MARKER.sub(render, markdown)
