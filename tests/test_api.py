"""The public surface: exactly the names DESIGN.md fixes, documented, shown as ours."""

from __future__ import annotations

import inspect

import psycopg

import aiopg_resilient
from aiopg_resilient import testing

DESIGN_NAMES = {
    "ResilientPool",
    "ResilientConnection",
    "RetryPolicy",
    "PoolStats",
    "PoolEvent",
    "Reconnected",
    "ConnectionLost",
    "CommitUnknown",
    "DatabaseUnavailable",
    "PoolTimeout",
    "PoolClosed",
    "classify",
    "Failure",
    "is_disconnect",
}
EXTRAS = {"set_testing", "ConfigureError"}


def test_all_is_exactly_the_public_surface() -> None:
    """__all__ lists the design's names (plus set_testing) and every one exists."""
    assert set(aiopg_resilient.__all__) == DESIGN_NAMES | EXTRAS
    public = {
        name
        for name, obj in vars(aiopg_resilient).items()
        if name.isidentifier() and not name.startswith("_") and not inspect.ismodule(obj)
    }
    assert public - {"annotations", "version", "PackageNotFoundError"} == set(
        aiopg_resilient.__all__
    )


def test_public_names_are_documented_and_ours() -> None:
    """Every public name has a docstring and shows as aiopg_resilient.X in tracebacks."""
    for name in aiopg_resilient.__all__:
        obj = getattr(aiopg_resilient, name)
        assert inspect.getdoc(obj), name
        if inspect.isclass(obj):
            assert obj.__module__ == "aiopg_resilient", name


def test_public_methods_are_documented() -> None:
    """Public methods of the pool and the connection have docstrings."""
    for cls in (aiopg_resilient.ResilientPool, aiopg_resilient.ResilientConnection):
        for name, member in inspect.getmembers(cls):
            if not name.startswith("_") and callable(member):
                assert inspect.getdoc(member), f"{cls.__name__}.{name}"


def test_errors_subclass_operational_error() -> None:
    """Existing `except psycopg.OperationalError` handlers keep catching our errors."""
    for name in (
        "ConnectionLost",
        "CommitUnknown",
        "DatabaseUnavailable",
        "PoolTimeout",
        "PoolClosed",
    ):
        assert issubclass(getattr(aiopg_resilient, name), psycopg.OperationalError)


def test_version_comes_from_metadata() -> None:
    """__version__ is read from the installed distribution, not hard-coded."""
    from importlib.metadata import version

    assert aiopg_resilient.__version__ == version("aiopg-resilient")


def test_testing_all_resolves() -> None:
    """Every name of aiopg_resilient.testing.__all__ imports."""
    for name in testing.__all__:
        assert getattr(testing, name) is not None


def test_py_typed_is_shipped() -> None:
    """The package ships py.typed, so users' type checkers read our annotations."""
    from importlib.resources import files

    assert files("aiopg_resilient").joinpath("py.typed").is_file()


def test_testing_classes_show_as_public() -> None:
    """The testing helpers show as aiopg_resilient.testing.X in tracebacks and reprs."""
    for name in testing.__all__:
        obj = getattr(testing, name)
        if inspect.isclass(obj):
            assert obj.__module__ == "aiopg_resilient.testing", name
            assert inspect.getdoc(obj), name
