"""Guarantee 4: bad configuration fails fast with one clear error and no retry storm."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from aiopg_resilient import ResilientPool
from aiopg_resilient.testing import PostgresServer

from .conftest import pool_for


async def _open_fails(dsn: str, app_name: str, match: str) -> ResilientPool:
    pool = pool_for(dsn, app_name)
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match=match):
        await pool.open()
    assert time.monotonic() - t0 < 2.0
    assert pool.stats.connect_failures == 1  # one attempt, no retries
    await pool.close()
    return pool


async def test_wrong_password(pg: PostgresServer, app_name: str) -> None:
    """A wrong password fails open() at once, after a single attempt."""
    await _open_fails(pg.conninfo(password="wrong"), app_name, "password authentication failed")


async def test_unknown_database(pg: PostgresServer, app_name: str) -> None:
    """An unknown database fails open() at once, after a single attempt."""
    await _open_fails(pg.conninfo(dbname="no_such_db"), app_name, 'database "no_such_db"')


async def test_unknown_role(pg: PostgresServer, app_name: str) -> None:
    """An unknown user fails open() at once."""
    await _open_fails(pg.conninfo(user="nobody"), app_name, "nobody")


def test_malformed_dsn_fails_at_construction() -> None:
    """A malformed DSN raises at construction, saying what the syntax should be."""
    with pytest.raises(psycopg.ProgrammingError, match="key=value"):
        ResilientPool("host='unterminated")
    with pytest.raises(psycopg.ProgrammingError, match="invalid connection string"):
        ResilientPool("just-a-word")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_size": -1},
        {"max_size": 0},
        {"min_size": 5, "max_size": 2},
        {"heartbeat_interval": 0},
        {"heartbeat_timeout": 0},
        {"acquire_timeout": -1},
        {"max_lifetime": 0},
        {"in_doubt": "guess"},
    ],
)
def test_bad_sizes_fail_at_construction(kwargs: dict[str, object]) -> None:
    """Out-of-range sizes and timeouts raise ValueError at construction."""
    with pytest.raises(ValueError, match="must be"):
        ResilientPool("", **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def plain_server() -> Iterator[PostgresServer]:
    """A second throwaway server with ssl=off."""
    with PostgresServer(ssl=False) as server:
        yield server


async def test_ssl_required_but_server_has_none(
    plain_server: PostgresServer, app_name: str
) -> None:
    """sslmode=require against a server without SSL fails at once with a clear message."""
    dsn = plain_server.conninfo(sslmode="require", sslrootcert=None)
    await _open_fails(dsn, app_name, "SSL")


async def test_wrong_password_while_running_fails_waiters(
    pg: PostgresServer, app_name: str
) -> None:
    """A pool whose credentials stop working fails its callers at once, not after the budget."""
    pool = pool_for(pg.conninfo(password="wrong"), app_name, min_size=0)
    await pool.open()  # min_size=0: nothing connects yet
    try:
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="password authentication"):
            await pool.fetchval("SELECT 1")
        assert time.monotonic() - t0 < 2.0
        assert pool.stats.connect_failures == 1
    finally:
        await pool.close()


def test_a_malformed_dsn_error_shows_no_part_of_a_password() -> None:
    """An unquoted password with a space: libpq quotes the stray token in its message;
    the error says what is wrong without it."""
    with pytest.raises(psycopg.ProgrammingError, match="invalid connection string") as caught:
        ResilientPool("host=db password=hunter2 sekrit99 dbname=app")
    assert "sekrit99" not in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert 'missing "="' in str(caught.value)


def test_a_malformed_dsn_error_is_one_line() -> None:
    """libpq ends its message with a newline: the error reads as one sentence."""
    with pytest.raises(psycopg.ProgrammingError, match="invalid connection string") as caught:
        ResilientPool("postgresql://app:pw@[bad")
    assert "\n" not in str(caught.value)
    assert "IPv6 host address" in str(caught.value)
