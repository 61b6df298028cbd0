"""Regression scenarios: what plain psycopg raises when a connection dies for real.

Each test reproduces one production failure against the real server, through `ChaosProxy`
or the server's own controls, with a plain `psycopg.AsyncConnection` (nothing of
aiopg_resilient in the way), and asserts the exception class and the exact text a user
sees. These are the failures the rest of the library must classify and survive.

The texts come from libpq, so they depend on its version (``psycopg.pq.version()``):
psycopg-binary 3.3.9 bundles libpq 18; ``PSYCOPG_IMPL=python`` uses the system's (libpq 15 on
Debian 12). `test_texts_with_the_system_libpq` re-runs this file that way. Observed:

========================================  ==============================================
scenario                                  text after "consuming input failed: "
========================================  ==============================================
TLS-terminating proxy cut (close_notify)  SSL connection has been closed unexpectedly (15, 18)
FIN without close_notify, TLS end to end  SSL error: unexpected eof while reading (18)
                                          SSL SYSCALL error: EOF detected (15)
RST while a query runs                    server closed the connection unexpectedly ... (15, 18)
FIN or RST on a non-TLS connection        server closed the connection unexpectedly ... (15, 18)
========================================  ==============================================
"""

from __future__ import annotations

import asyncio
import ctypes.util
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import anyio
import psycopg
import psycopg.errors
import pytest
import pytest_asyncio

from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import until_value

Conn = psycopg.AsyncConnection[tuple[Any, ...]]
Connect = Callable[[str | None], Awaitable[Conn]]

LIBPQ = psycopg.pq.version() // 10000

SSL_CLOSED = "consuming input failed: SSL connection has been closed unexpectedly"
"""The peer sent a TLS close_notify, then FIN: a TLS-terminating (cloud) proxy dropped us."""

_RAGGED_EOF = {
    15: "consuming input failed: SSL SYSCALL error: EOF detected",
    18: "consuming input failed: SSL error: unexpected eof while reading",
}
RAGGED_EOF = {_RAGGED_EOF[LIBPQ]} if LIBPQ in _RAGGED_EOF else set(_RAGGED_EOF.values())
"""A FIN with no close_notify under TLS: OpenSSL 3 calls it an unexpected EOF."""

_SERVER_CLOSED_LINE = (
    "server closed the connection unexpectedly\n"
    "\tThis probably means the server terminated abnormally\n"
    "\tbefore or while processing the request."
)
SERVER_CLOSED = f"consuming input failed: {_SERVER_CLOSED_LINE}"
SERVER_CLOSED_TWICE = f"{SERVER_CLOSED}\n{_SERVER_CLOSED_LINE}"
"""An RST while a query is in flight: libpq records the message twice."""

ADMIN_SHUTDOWN = "terminating connection due to administrator command"


def dsn(proxy: ChaosProxy) -> str:
    """The DSN through a proxy built by `ChaosProxy.for_server` (the fixtures)."""
    assert proxy.dsn is not None
    return proxy.dsn


def refused(host: str, port: int) -> str:
    return (
        f'connection failed: connection to server at "{host}", port {port} failed: '
        "Connection refused\n\tIs the server running on that host and accepting TCP/IP "
        "connections?"
    )


@pytest_asyncio.fixture
async def conn_through(app_name: str) -> AsyncIterator[Connect]:
    """Open autocommit connections (closed afterwards) tagged with the test's app name."""
    conns: list[Conn] = []

    async def connect(conninfo: str | None) -> Conn:
        assert conninfo is not None
        conn = await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, application_name=app_name
        )
        await conn.execute("SELECT 1")
        conns.append(conn)
        return conn

    yield connect
    for conn in conns:
        await conn.close()


async def running_queries(pg: PostgresServer, app_name: str) -> int:
    rows = await pg.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = %s AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'",
        (app_name,),
    )
    return int(rows[0][0])


async def fail_in_flight(
    pg: PostgresServer, conn: Conn, app_name: str, fault: Callable[[], int]
) -> psycopg.OperationalError:
    """Start a 2 s query, inject `fault` once the server runs it, return what psycopg raises."""
    query = asyncio.ensure_future(conn.execute("SELECT pg_sleep(2)"))
    await until_value(lambda: running_queries(pg, app_name), 1)
    fault()
    with pytest.raises(psycopg.OperationalError) as info:
        await query
    return info.value


# -- 1. a TLS-terminating proxy drops the session ----------------------------------------------


@pytest.mark.parametrize("when", ["idle", "in_flight"])
@pytest.mark.asyncio
async def test_tls_proxy_cut_gives_ssl_connection_closed_unexpectedly(
    pg: PostgresServer,
    tls_chaos_proxy: ChaosProxy,
    conn_through: Connect,
    app_name: str,
    when: Literal["idle", "in_flight"],
) -> None:
    """A proxy's close_notify + FIN gives the production 'SSL connection has been closed'."""
    conn = await conn_through(tls_chaos_proxy.dsn)
    if when == "idle":
        assert tls_chaos_proxy.cut() == 1
        with pytest.raises(psycopg.OperationalError) as info:
            await conn.execute("SELECT 1")
        error = info.value
    else:
        error = await fail_in_flight(pg, conn, app_name, tls_chaos_proxy.cut)
    assert type(error) is psycopg.OperationalError
    assert str(error) == SSL_CLOSED
    assert conn.broken


# -- 2. a FIN without close_notify, TLS end to end -------------------------------------------


@pytest.mark.asyncio
async def test_pass_through_cut_gives_unexpected_eof(
    chaos_proxy: ChaosProxy, conn_through: Connect
) -> None:
    """A plain TCP FIN under end-to-end TLS is a ragged EOF: 'unexpected eof while reading'."""
    conn = await conn_through(chaos_proxy.dsn)
    assert chaos_proxy.cut() == 1
    with pytest.raises(psycopg.OperationalError) as info:
        await conn.execute("SELECT 1")
    assert type(info.value) is psycopg.OperationalError
    assert str(info.value) in RAGGED_EOF
    assert conn.broken


# -- 3. an RST --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_reset_during_query_gives_server_closed_unexpectedly(
    pg: PostgresServer, chaos_proxy: ChaosProxy, conn_through: Connect, app_name: str
) -> None:
    """An RST while a query runs gives 'server closed the connection unexpectedly' (twice)."""
    conn = await conn_through(chaos_proxy.dsn)
    error = await fail_in_flight(pg, conn, app_name, chaos_proxy.reset)
    assert type(error) is psycopg.OperationalError
    assert str(error) == SERVER_CLOSED_TWICE
    assert conn.broken


@pytest.mark.asyncio
async def test_reset_while_idle_gives_unexpected_eof(
    chaos_proxy: ChaosProxy, conn_through: Connect
) -> None:
    """An RST to an idle TLS connection surfaces on the next query as an unexpected EOF.

    The send after the RST consumes the socket error; the read then sees a plain EOF.
    """
    conn = await conn_through(chaos_proxy.dsn)
    assert chaos_proxy.reset() == 1
    with pytest.raises(psycopg.OperationalError) as info:
        await conn.execute("SELECT 1")
    assert str(info.value) in RAGGED_EOF
    assert conn.broken


@pytest.mark.parametrize("fault", ["cut", "reset"])
@pytest.mark.asyncio
async def test_fault_without_tls_gives_server_closed_unexpectedly(
    pg: PostgresServer, chaos_proxy: ChaosProxy, conn_through: Connect, fault: str
) -> None:
    """Without TLS (sslmode=disable) a FIN or an RST reads 'server closed ... unexpectedly'."""
    conn = await conn_through(
        pg.conninfo(host=chaos_proxy.host, port=chaos_proxy.port, sslmode="disable")
    )
    assert getattr(chaos_proxy, fault)() == 1
    with pytest.raises(psycopg.OperationalError) as info:
        await conn.execute("SELECT 1")
    assert str(info.value) == SERVER_CLOSED
    assert conn.broken


# -- 4. the server ends the session ----------------------------------------------------------


@pytest.mark.asyncio
async def test_terminated_backend_gives_admin_shutdown(
    pg: PostgresServer, chaos_proxy: ChaosProxy, conn_through: Connect, app_name: str
) -> None:
    """pg_terminate_backend: AdminShutdown (57P01) on the next query."""
    conn = await conn_through(chaos_proxy.dsn)
    assert await pg.terminate_backends(application_name=app_name) == 1
    with pytest.raises(psycopg.errors.AdminShutdown) as info:
        await conn.execute("SELECT 1")
    assert info.value.sqlstate == "57P01"
    assert str(info.value) == ADMIN_SHUTDOWN
    assert conn.broken


@pytest.mark.asyncio
async def test_fast_restart_gives_admin_shutdown(
    pg: PostgresServer, chaos_proxy: ChaosProxy, conn_through: Connect
) -> None:
    """A fast shutdown/restart: AdminShutdown (57P01) on the next query."""
    conn = await conn_through(chaos_proxy.dsn)
    await pg.restart("fast")
    with pytest.raises(psycopg.errors.AdminShutdown) as info:
        await conn.execute("SELECT 1")
    assert info.value.sqlstate == "57P01"
    assert str(info.value) == ADMIN_SHUTDOWN
    assert conn.broken


# -- 5. a half-open connection -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.asyncio
async def test_frozen_query_with_asyncio_timeout_waits_for_psycopg_cancel(
    chaos_proxy: ChaosProxy, conn_through: Connect
) -> None:
    """Through a frozen proxy a query hangs; asyncio.wait_for(1) returns only after ~6 s.

    On one asyncio cancellation psycopg sends a cancel request (a new connection, which the
    proxy lets through) and then waits up to 5 s for the query's reply, which the frozen
    connection never delivers; then it closes the connection. So 1 + 5 s.
    """
    conn = await conn_through(chaos_proxy.dsn)
    chaos_proxy.freeze()
    start = time.monotonic()
    with pytest.raises((TimeoutError, asyncio.TimeoutError)):
        await asyncio.wait_for(conn.execute("SELECT 1"), 1)
    elapsed = time.monotonic() - start
    assert 5.5 <= elapsed < 8
    assert conn.broken
    assert conn.closed


@pytest.mark.asyncio
async def test_frozen_query_with_anyio_timeout_returns_at_the_deadline(
    chaos_proxy: ChaosProxy, conn_through: Connect
) -> None:
    """Through a frozen proxy a query hangs; anyio.fail_after(1) returns right at 1 s.

    An anyio cancel scope delivers the cancellation again at psycopg's cancel attempt, so
    psycopg gives up on it at once and closes the connection.
    """
    conn = await conn_through(chaos_proxy.dsn)
    chaos_proxy.freeze()
    start = time.monotonic()
    with pytest.raises(TimeoutError), anyio.fail_after(1):
        await conn.execute("SELECT 1")
    elapsed = time.monotonic() - start
    assert 1 <= elapsed < 2.5
    version = tuple(int(part) for part in psycopg.__version__.split(".")[:3])
    if version >= (3, 3, 9):  # older psycopg leaves the connection as it was (ACTIVE)
        assert conn.broken
        assert conn.closed


# -- 6. nobody listening ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_connect_to_stopped_server_is_refused(
    pg: PostgresServer, chaos_proxy: ChaosProxy, tls_chaos_proxy: ChaosProxy
) -> None:
    """A stopped server refuses connects; through a proxy the client sees it close instead."""
    await pg.stop("immediate")
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            await psycopg.AsyncConnection.connect(pg.dsn)
        assert str(info.value) == refused(pg.host, pg.port)
        # A proxy accepts, fails to reach the server, and closes the client's connection.
        port = chaos_proxy.port
        with pytest.raises(psycopg.OperationalError) as info:
            await psycopg.AsyncConnection.connect(dsn(chaos_proxy))
        assert str(info.value) == (
            f'connection failed: connection to server at "{pg.host}", port {port} failed: '
            f"{_SERVER_CLOSED_LINE}"
        )
        port = tls_chaos_proxy.port
        with pytest.raises(psycopg.OperationalError) as info:
            await psycopg.AsyncConnection.connect(dsn(tls_chaos_proxy))
        assert str(info.value) == (
            f'connection failed: connection to server at "{pg.host}", port {port} failed: '
            "SSL connection has been closed unexpectedly"
        )
    finally:
        await pg.start()
    conn = await psycopg.AsyncConnection.connect(dsn(chaos_proxy))
    await conn.close()


@pytest.mark.asyncio
async def test_refusing_proxy_gives_connection_refused(chaos_proxy: ChaosProxy) -> None:
    """proxy.refuse(): 'Connection refused'; proxy.accept() lets the next connect through."""
    chaos_proxy.refuse()
    with pytest.raises(psycopg.OperationalError) as info:
        await psycopg.AsyncConnection.connect(dsn(chaos_proxy))
    assert type(info.value) is psycopg.OperationalError
    assert str(info.value) == refused(chaos_proxy.host, chaos_proxy.port)
    chaos_proxy.accept()
    conn = await psycopg.AsyncConnection.connect(dsn(chaos_proxy))
    await conn.close()


# -- a commit whose outcome the client never learns ------------------------------------------


async def row_count(pg: PostgresServer, table: str) -> int:
    return int((await pg.execute(f"SELECT count(*) FROM {table}"))[0][0])


async def backends(pg: PostgresServer, app_name: str) -> int:
    rows = await pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
    )
    return int(rows[0][0])


@pytest.mark.parametrize(("action", "committed"), [("cut_after", 1), ("cut_before", 0)])
@pytest.mark.asyncio
async def test_commit_lost_in_a_cut(
    pg: PostgresServer,
    tls_chaos_proxy: ChaosProxy,
    conn_through: Connect,
    table: str,
    app_name: str,
    action: Literal["cut_after", "cut_before"],
    committed: int,
) -> None:
    """A cut around COMMIT: the same error whether the server committed (after) or not."""
    conn = await conn_through(tls_chaos_proxy.dsn)
    await conn.set_autocommit(False)
    await conn.execute(f"INSERT INTO {table} VALUES ('k', 1)")
    trigger = tls_chaos_proxy.on_client_message(b"COMMIT", action)
    with pytest.raises(psycopg.OperationalError) as info:
        await conn.commit()
    assert trigger.fired.is_set()
    assert str(info.value) == SSL_CLOSED
    assert conn.broken
    await until_value(lambda: backends(pg, app_name), 0)
    assert await row_count(pg, table) == committed


# -- the same texts with the system's libpq -------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("PSYCOPG_IMPL") == "python", reason="already running on the system libpq"
)
@pytest.mark.skipif(ctypes.util.find_library("pq") is None, reason="no system libpq (libpq5)")
def test_texts_with_the_system_libpq() -> None:
    """This file's assertions also hold with the system libpq (PSYCOPG_IMPL=python)."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-q",
            "-m",
            "not slow",
            "-p",
            "no:cacheprovider",
        ],
        cwd=root,
        env={**os.environ, "PSYCOPG_IMPL": "python"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
