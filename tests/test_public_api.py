"""The public surface: what ``__all__`` promises is what the package exports, and it is typed."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
from types import ModuleType

import pytest

import telemetrydeck_async
from telemetrydeck_async.devserver import IngestEmulator

from . import typing_api


def _public_names(module: ModuleType) -> set[str]:
    """Names a user can reach as ``module.name``: not private, not a submodule."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }


def _isort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps ``__all__`` in: CONSTANTS, then Classes, then the rest."""
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def _public_modules() -> list[str]:
    """Every public submodule of the package (``devserver``, ``exceptions``, integrations...)."""
    return sorted(
        f"telemetrydeck_async.{info.name}"
        for info in pkgutil.iter_modules(telemetrydeck_async.__path__)
        if not info.name.startswith("_")
    )


def test_all_lists_exactly_the_public_names() -> None:
    """``__all__`` names every public attribute of the package, and nothing else."""
    exported = set(telemetrydeck_async.__all__)
    assert exported == _public_names(telemetrydeck_async) | {"__version__"}


def test_all_is_sorted_without_duplicates() -> None:
    """``__all__`` is kept sorted (the RUF022 order) and names each thing once."""
    names = telemetrydeck_async.__all__
    assert len(set(names)) == len(names)
    assert names == sorted(names, key=_isort_key)


def test_every_exported_name_is_importable() -> None:
    """``from telemetrydeck_async import NAME`` works for each name in ``__all__``."""
    for name in telemetrydeck_async.__all__:
        namespace: dict[str, object] = {}
        exec(f"from telemetrydeck_async import {name}", namespace)
        assert namespace[name] is getattr(telemetrydeck_async, name)


def test_every_exported_class_and_function_has_a_docstring() -> None:
    """Each public class and function says what it is for (it is what the API docs show)."""
    undocumented = [
        name
        for name in telemetrydeck_async.__all__
        if (inspect.isclass(obj := getattr(telemetrydeck_async, name)) or inspect.isfunction(obj))
        and not inspect.getdoc(obj)
    ]
    assert undocumented == []


@pytest.mark.parametrize("module_name", _public_modules())
def test_public_submodule_all_is_accurate(module_name: str) -> None:
    """A public submodule declares ``__all__`` and every name in it exists."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # an integration whose optional framework is not installed
        if exc.name is not None and not exc.name.startswith("telemetrydeck_async"):
            pytest.skip(f"{module_name} needs {exc.name}, which is not installed")
        raise
    assert module.__doc__, f"{module_name} has no module docstring"
    declared = getattr(module, "__all__", None)
    assert declared is not None, f"{module_name} has no __all__"
    missing = [name for name in declared if not hasattr(module, name)]
    assert missing == []


def test_version_matches_the_installed_metadata() -> None:
    """``__version__`` is the version pip installed, so bug reports name the right release."""
    try:
        installed = importlib.metadata.version("telemetrydeck-async")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("telemetrydeck-async is not installed (running from a bare source tree)")
    assert telemetrydeck_async.__version__ == installed


async def test_typed_usage_file_runs_against_the_emulator(emulator: IngestEmulator) -> None:
    """The usage file mypy checks (``tests/typing_api.py``) is also correct at run time."""
    sent = await typing_api.main(emulator.base_url)
    assert sent == len(emulator.signals) > 0
