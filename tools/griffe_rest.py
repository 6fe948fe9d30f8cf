"""A Griffe extension: the package's reST-flavoured docstrings, read as Markdown.

The docstrings follow the Python convention of ``:class:`Name``` roles and ``::`` before an
example, which mkdocstrings (Markdown) would show literally. This rewrites them for the site
only: a role becomes inline code of the name, and ``text::`` becomes ``text:`` (the indented
example after it is a Markdown code block already). The source stays as Python tools expect.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj|const):`~?\.?(?P<target>[^`]+)`")
# "text ::" drops the marker, "text::" keeps one colon (as reST itself renders them).
_DETACHED_MARKER = re.compile(r"[ \t]+::[ \t]*$", re.MULTILINE)
_ATTACHED_MARKER = re.compile(r"::[ \t]*$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    return f"`{match['target'].rsplit('.', 1)[-1]}`"


def markdown(text: str) -> str:
    """``text`` with its reST roles and ``::`` markers rewritten for Markdown."""
    text = _ROLE.sub(_role, text)
    return _ATTACHED_MARKER.sub(":", _DETACHED_MARKER.sub("", text))


class ReSTToMarkdown(griffe.Extension):
    """Rewrites every docstring Griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
