"""The public surface: what ``__all__`` promises is what the package exports, and it is typed."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
from types import ModuleType

import attrs
import pytest

import telemetrydeck_async
from telemetrydeck_async._config import ClientConfig
from telemetrydeck_async.devserver import IngestEmulator
from tests import typing_api


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


#: Where a facade's signature deliberately differs from ``ClientConfig``'s field: the facade
#: takes more (None for a factory default, a path the converter turns into a str or a context).
#: Each entry is (the facade's default, the facade's annotation); anything else must agree.
WIDENED_AT_THE_FACADE: dict[str, tuple[object, str]] = {
    "default_payload": (None, "Mapping[str, Any] | None"),
    "retry": (None, "RetryPolicy | None"),
    "default_user_file": (None, "str | os.PathLike[str] | None"),
    "ssl": (None, "str | os.PathLike[str] | _ssl.SSLContext | None"),
}


@pytest.mark.parametrize(
    "facade",
    [telemetrydeck_async.TelemetryClient, telemetrydeck_async.SyncTelemetryClient],
    ids=lambda cls: cls.__name__,
)
def test_facade_options_agree_with_client_config(facade: type) -> None:
    """Both constructors list ClientConfig's options: same order, defaults and annotations.

    The constructors keep explicit typed signatures (IDE help, mypy); ClientConfig is the one
    source they must agree with. Also end to end: a facade built with every default holds a
    config equal to ``ClientConfig``'s own defaults.
    """
    params = inspect.signature(facade.__init__).parameters
    fields = attrs.fields(ClientConfig)
    assert [name for name in params if name != "self"] == [field.name for field in fields]
    for field in fields:
        param = params[field.name]
        if field.default is attrs.NOTHING:
            assert param.default is inspect.Parameter.empty, field.name
            assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, field.name
        else:
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, field.name
        wanted = WIDENED_AT_THE_FACADE.get(field.name)
        if wanted is None:
            if field.default is not attrs.NOTHING:
                assert param.default == field.default, field.name
            assert param.annotation == field.type, field.name
        else:
            assert (param.default, param.annotation) == wanted, field.name
    # Built, never started: no loop, thread, file or socket to clean up.
    assert facade("app").config == ClientConfig(app_id="app")
