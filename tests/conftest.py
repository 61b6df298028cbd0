"""Shared helpers for the suite; the server and proxy fixtures come from the package's
own pytest plugin (aiopg_resilient.testing.pytest_plugin)."""

from __future__ import annotations

import asyncio
import itertools
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
import pytest_asyncio

from aiopg_resilient import ResilientPool
from aiopg_resilient.testing import PostgresServer

_names = itertools.count()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After each test, close the event loop pytest-asyncio may leave set but idle (on
    Python 3.10 its teardown installs a fresh loop, and asyncio.get_event_loop() makes
    one): unclosed, it is garbage collected during some later test, whose unraisable
    ResourceWarning then fails it (seen at the floor versions in CI)."""
    yield
    policy = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = policy.get_event_loop()
        except RuntimeError:
            return
    if not loop.is_running() and not loop.is_closed():
        loop.close()
        policy.set_event_loop(None)


@pytest.fixture
def app_name() -> str:
    """A unique application_name, so a test can find its own backends."""
    return f"t{next(_names)}"


@pytest_asyncio.fixture
async def table(pg: PostgresServer, app_name: str) -> AsyncIterator[str]:
    """A fresh table `(k text, v int)` without a unique constraint, dropped afterwards."""
    name = f"tbl_{app_name}"
    await pg.execute(f"CREATE TABLE {name} (k text, v int)")
    yield name
    if pg.running:
        await pg.execute(f"DROP TABLE IF EXISTS {name}")


async def backends(pg: PostgresServer, app_name: str) -> int:
    """How many client backends with this application_name the server has."""
    rows = await pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
    )
    return int(rows[0][0])


def pool_for(dsn: str, app_name: str, **kwargs: object) -> ResilientPool:
    """A pool named after the test (its application_name)."""
    return ResilientPool(dsn, name=app_name, **kwargs)  # type: ignore[arg-type]


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait (bounded) until *cond()* is true."""
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.01)


async def until_value(
    fn: Callable[[], Awaitable[Any]], expected: Any, timeout: float = 3.0
) -> None:
    """Wait (bounded) until ``await fn()`` returns *expected*."""
    with anyio.fail_after(timeout):
        while await fn() != expected:
            await anyio.sleep(0.02)
