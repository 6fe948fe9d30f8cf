"""The package as published: metadata that is true, a README whose links work off-site.

Building the wheel and the sdist, ``twine check`` and installing the wheel into fresh venvs are
CI steps (``.ci/run``): they take tens of seconds and need the build tools.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover  # Python 3.10 has no tomllib; the core run skips this module
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
README = ROOT / "README.md"
pytestmark = pytest.mark.skipif(
    not (ROOT / "telemetrydeck_async").is_dir(), reason="needs the source tree, not a wheel"
)

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _project() -> dict[str, object]:
    return tomllib.loads(PYPROJECT.read_text("utf-8"))["project"]  # type: ignore[no-any-return]


def test_readme_links_are_absolute_and_point_at_files_that_exist() -> None:
    """On the package index page a relative link is dead: every link is absolute or an anchor."""
    urls = _project()["urls"]
    assert isinstance(urls, dict)
    base = str(urls["Homepage"]).rstrip("/") + "/blob/main/"
    links = _LINK.findall(README.read_text("utf-8"))
    assert links, "no links found: the pattern is wrong"
    for link in links:
        assert link.startswith(("https://", "#")), f"relative link {link!r} in README.md"
        if link.startswith(base):
            path = link.removeprefix(base).partition("#")[0]
            assert (ROOT / path).is_file(), f"{link} names {path}, which does not exist"


def test_the_project_urls_share_one_address() -> None:
    """Homepage, Documentation, Changelog and Issues all start with the Homepage."""
    urls = _project()["urls"]
    assert isinstance(urls, dict)
    home = str(urls["Homepage"])
    assert set(urls) >= {"Homepage", "Documentation", "Changelog", "Issues"}
    assert all(str(url).startswith(home) for url in urls.values())


def test_the_license_file_matches_the_metadata() -> None:
    """license = "MIT", the LICENSE file is shipped and says MIT."""
    project = _project()
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text("utf-8").startswith("MIT License")


def test_classifiers_name_every_supported_python() -> None:
    """One classifier per minor version from requires-python's floor to 3.13."""
    project = _project()
    floor = re.fullmatch(r">=3\.(\d+)", str(project["requires-python"]))
    assert floor is not None
    classifiers = project["classifiers"]
    assert isinstance(classifiers, list)
    for minor in range(int(floor[1]), 14):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert any(c.startswith("Operating System ::") for c in classifiers)


def test_the_sdist_ships_what_the_tests_read() -> None:
    """The tests read docs/ (examples, reference tables): the sdist includes it."""
    config = tomllib.loads(PYPROJECT.read_text("utf-8"))
    include = config["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]
    assert {"telemetrydeck_async", "tests", "docs", "LICENSE", "README.md"} <= set(include)


@pytest.mark.parametrize(
    "module",
    [
        "pipeline/test_pipeline",
        "pipeline/test_validation",
        "spool/test_spool",
        "delivery/test_delivery",
    ],
)
def test_the_core_marker_covers_the_core_modules(module: str) -> None:
    """CI runs ``-m core`` on the installed wheel: pipeline, validation, spool, delivery.

    Read as text, the way .ci/run finds the modules to collect (importing test_spool alone
    takes seconds).
    """
    source = (ROOT / "tests" / f"{module}.py").read_text("utf-8")
    assert "\npytestmark = pytest.mark.core\n" in source
