"""Every ```python example in README.md and docs/ runs, so the documentation cannot rot.

Pages are found by globbing (``README.md``, ``docs/**/*.md``): a new page is tested as soon
as it exists. Each page is one test; its examples run in order, like cells of a notebook.

Conventions for writing a page (they are also in ``docs/contributing.md`` of the site):

* **One namespace per page.** A name defined in one example is visible in the next.
  ``__name__`` is ``"__main__"``, so ``if __name__ == "__main__": asyncio.run(main())`` runs.
* **Top-level ``await``** is allowed: such an example runs on the page's own event loop, which
  stays the same for the whole page.
* **A server for every page.** Each page gets its own ingest emulator on ``127.0.0.1:0``,
  running in a background thread. Its URL is ``BASE_URL`` in the page's namespace and the
  emulator itself is ``emulator`` (read ``emulator.signals`` after a flush).
* **Ready-made client.** ``td`` is predefined: a ``TelemetryClient`` aimed at the page's
  emulator with ``default_user="user-42"``, bound to the page's loop on first use and closed
  after the last example. Snippets like ``await td.signal("App.launched")`` run as shown.
* **No network, ever.** A client built with TelemetryDeck's real URL (the default
  ``base_url``) or with the devserver's documented ``http://127.0.0.1:8787`` /
  ``http://localhost:8787`` is pointed at the page's emulator instead; any other
  non-loopback ``base_url`` fails the test.
* **Files.** An example whose first line is a comment naming a Python file
  (``# shop/checkout.py``) is also written to that path, so a later example can import it.
  Every page runs in a fresh temporary working directory, which is also on ``sys.path``;
  environment variables a page sets are undone after it.
* ``<!-- docs-test: skip -->`` (anything may follow ``skip``, e.g. the reason) on the line(s)
  before an example: it is not run. For signatures, deployment snippets that would serve
  forever, and code needing software the test suite does not install.
* ``<!-- docs-test: hidden`` … ``-->``: the lines in between run at that point but are not
  shown on the site (set-up such as ``form = {"quantity": "x"}`` for a snippet using ``form``).
* Annotations are not evaluated (``from __future__ import annotations`` is in effect), so
  ``def parse(text: str) -> Document: ...`` needs no ``Document``.
* A page's examples get 60 seconds in all.
"""

from __future__ import annotations
import __future__ as _future

import ast
import asyncio
import contextlib
import inspect
import ipaddress
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import pytest

from telemetrydeck_async import DEFAULT_BASE_URL, TelemetryClient
from telemetrydeck_async.devserver import IngestEmulator

ROOT = Path(__file__).resolve().parents[2]
PAGE_TIMEOUT = 60.0
#: Base URLs an example may use that mean "the ingest server": rewritten to the page's emulator.
PLACEHOLDER_URLS = frozenset(
    {
        DEFAULT_BASE_URL,
        DEFAULT_BASE_URL + "/",
        "http://127.0.0.1:8787",
        "http://localhost:8787",
    }
)

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b.*?-->")
_HIDDEN_OPEN = re.compile(r"^\s*<!--\s*docs-test:\s*hidden\s*$")
_FILE_COMMENT = re.compile(r"^#\s*(?P<path>[\w./-]+\.py)\s*$")
_RUN_LANGUAGES = frozenset({"python", "py"})
_COMPILE_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT | _future.annotations.compiler_flag


@dataclass(frozen=True)
class Example:
    """One runnable piece of a page: its code and the line of the page it starts on."""

    line: int
    code: str
    hidden: bool = False


def find_examples(text: str) -> list[Example]:
    """The runnable examples of a Markdown page, in order (see the module docstring)."""
    lines = text.splitlines()
    examples: list[Example] = []
    skip_next = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if _HIDDEN_OPEN.match(line):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->"), None)
            if end is None:
                raise ValueError(f"line {i + 1}: '<!-- docs-test: hidden' is never closed")
            examples.append(Example(i + 2, "\n".join(lines[i + 1 : end]), hidden=True))
            i = end + 1
            continue
        if _SKIP.search(line):
            skip_next = True
        match = _FENCE.match(line)
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        language = (match["info"].split() or [""])[0].strip("{}.").lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(
            rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]
        ):
            body.append(lines[j].removeprefix(indent))
            j += 1
        if language in _RUN_LANGUAGES and not skip_next:
            examples.append(Example(i + 2, "\n".join(body)))
        skip_next = False  # a skip marker covers the next block only
        i = j + 1
    return examples


def _pages() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [page for page in pages if page.is_file()]


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name


PAGES_WITH_EXAMPLES = [page for page in _pages() if find_examples(page.read_text("utf-8"))]


class ThreadedEmulator:
    """An ingest emulator serving from its own thread and loop, whatever the examples do."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.emulator = IngestEmulator(host="127.0.0.1", port=0)

    def __enter__(self) -> IngestEmulator:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.emulator.start(), self.loop).result(10)
        return self.emulator

    def __exit__(self, *exc_info: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.emulator.stop(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _redirected_clients(base_url: str) -> Iterator[list[TelemetryClient]]:
    """Point every client an example builds at ``base_url``; refuse anything off-machine.

    Yields the list of the clients built meanwhile, so that they can all be closed.
    """
    original = TelemetryClient.__init__
    built: list[TelemetryClient] = []

    def redirecting_init(self: TelemetryClient, *args: Any, **options: Any) -> None:
        url = options.get("base_url", DEFAULT_BASE_URL)
        if url in PLACEHOLDER_URLS:
            options["base_url"] = base_url
        elif isinstance(url, str) and not _is_loopback(url):
            raise AssertionError(
                f"a docs example would send signals to {url}; examples must not use the "
                "network (use the default base_url, BASE_URL, or mark the block with "
                "<!-- docs-test: skip -->)"
            )
        original(self, *args, **options)
        built.append(self)

    TelemetryClient.__init__ = redirecting_init  # type: ignore[method-assign]  # restored below
    try:
        yield built
    finally:
        TelemetryClient.__init__ = original  # type: ignore[method-assign]  # the original


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (an example that never ends)."""
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return

    def expired(_signum: int, _frame: FrameType | None) -> None:
        raise TimeoutError(f"the page's examples ran for more than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _write_named_file(example: Example, workdir: Path) -> None:
    """``# pkg/module.py`` as an example's first line: also write the example to that path."""
    first = example.code.lstrip().split("\n", 1)[0]
    match = _FILE_COMMENT.match(first)
    if match is None:
        return
    target = (workdir / match["path"]).resolve()
    assert target.is_relative_to(workdir), f"{match['path']} is outside the page's directory"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(example.code + "\n", "utf-8")


def run_page(page: Path, workdir: Path) -> IngestEmulator:
    """Run every example of ``page`` in order; return the emulator they talked to."""
    examples = find_examples(page.read_text("utf-8"))
    where = _page_id(page)
    loop = asyncio.new_event_loop()
    modules_before = set(sys.modules)
    environ_before = dict(os.environ)
    sys.path.insert(0, str(workdir))
    try:
        with ThreadedEmulator() as emulator, _redirected_clients(emulator.base_url) as clients:
            namespace: dict[str, Any] = {
                "__name__": "__main__",
                "BASE_URL": emulator.base_url,
                "emulator": emulator,
                "td": TelemetryClient(
                    "YOUR-APP-ID", namespace="com.example", default_user="user-42"
                ),
            }
            try:
                with _time_limit(PAGE_TIMEOUT):
                    for example in examples:
                        _write_named_file(example, workdir)
                        # Padding keeps tracebacks on the line numbers of the Markdown page.
                        source = "\n" * (example.line - 1) + example.code
                        try:
                            code = compile(source, str(page), "exec", flags=_COMPILE_FLAGS)
                            if code.co_flags & inspect.CO_COROUTINE:
                                loop.run_until_complete(eval(code, namespace))
                            else:
                                exec(code, namespace)
                        except Exception as exc:
                            kind = "hidden set-up" if example.hidden else "example"
                            raise AssertionError(
                                f"the {kind} at {where}:{example.line} failed: {exc!r}\n"
                                "(not meant to run? put <!-- docs-test: skip --> before it; "
                                "conventions: tests/docs/test_docs_examples.py)"
                            ) from exc
            finally:
                _close_clients(clients, loop)
    finally:
        loop.close()
        os.environ.clear()
        os.environ.update(environ_before)
        sys.path.remove(str(workdir))
        for name in set(sys.modules) - modules_before:
            module_file = getattr(sys.modules[name], "__file__", None) or ""
            if module_file.startswith(str(workdir)):
                del sys.modules[name]
    return emulator


def _close_clients(clients: list[TelemetryClient], loop: asyncio.AbstractEventLoop) -> None:
    """Close the clients the examples left open on the page's loop (as a program would)."""
    for client in clients:
        if not client.closed and getattr(client, "_loop", None) in (None, loop):
            loop.run_until_complete(client.aclose(timeout=10))


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=_page_id)
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's python examples run in order against an emulator, and none of them fails."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TELEMETRYDECK_DISABLED", raising=False)
    run_page(page, tmp_path)


def test_readme_examples_are_found() -> None:
    """The collector sees README.md's examples (a guard against it silently finding nothing)."""
    assert find_examples((ROOT / "README.md").read_text("utf-8"))


def test_collector_honours_skip_hidden_and_indented_fences() -> None:
    """skip markers, hidden set-up, indented fences and other languages are read as documented."""
    page = """<!-- docs-test: hidden
x = 1
-->
```python
y = x + 1
```
<!-- docs-test: skip (needs a real server) -->
```python
serve_forever()
```
- a list item:

  ```py
  z = y
  ```
```sh
rm -rf /
```
"""
    assert find_examples(page) == [
        Example(2, "x = 1", hidden=True),
        Example(5, "y = x + 1"),
        Example(14, "z = y"),
    ]


def test_examples_cannot_reach_the_network(tmp_path: Path) -> None:
    """A client aimed at a non-loopback host is refused inside the harness."""
    page = tmp_path / "page.md"
    page.write_text(
        "```python\n"
        "from telemetrydeck_async import TelemetryClient\n"
        "TelemetryClient('A', base_url='https://example.com')\n"
        "```\n"
    )
    with pytest.raises(AssertionError, match="must not use the network"):
        run_page(page, tmp_path)


def test_the_default_url_is_redirected_to_the_emulator(tmp_path: Path) -> None:
    """An example written against TelemetryDeck's real URL talks to the page's emulator."""
    page = tmp_path / "page.md"
    page.write_text(
        "```python\n"
        "from telemetrydeck_async import TelemetryClient\n"
        "async with TelemetryClient('APP', default_user='u') as client:\n"
        "    await client.signal('Docs.tested')\n"
        "```\n"
    )
    emulator = run_page(page, tmp_path)
    assert [s["type"] for s in emulator.signals] == ["Docs.tested"]
