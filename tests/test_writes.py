"""Guarantee 2: writes are never doubled and never silently lost.

The TLS-terminating proxy sees the protocol in clear, so it can cut or freeze a session
exactly around the COMMIT message: before the server gets it, or after the server ran
it but before the client gets the answer.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import psycopg
import pytest

from aiopg_resilient import CommitUnknown, ConnectionLost, ResilientPool
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import pool_for

# (proxy action on the COMMIT message, whether the server applied the COMMIT)
COMMIT_FAULTS = [
    ("cut_after", True),  # answer lost: committed
    ("cut_before", False),  # COMMIT never arrived: the server rolls back on EOF
    ("freeze_after", True),  # half-open: committed, answer held forever
    ("freeze_before", False),  # half-open: the old backend still holds the transaction
]


def _pool(proxy: ChaosProxy, app_name: str, **kwargs: Any) -> ResilientPool:
    assert proxy.dsn is not None
    return pool_for(proxy.dsn, app_name, max_size=2, heartbeat_timeout=0.5, **kwargs)


async def _count(pg: PostgresServer, table: str) -> int:
    return int((await pg.execute(f"SELECT count(*) FROM {table}"))[0][0])


@pytest.mark.parametrize(("action", "applied"), COMMIT_FAULTS)
async def test_execute_commit_fault_is_resolved(
    pg: PostgresServer,
    tls_chaos_proxy: ChaosProxy,
    app_name: str,
    table: str,
    action: str,
    applied: bool,
) -> None:
    """execute() resolves a COMMIT whose answer was lost: committed -> success without a
    re-run; aborted (or terminated half-open backend) -> re-run exactly once."""
    async with _pool(tls_chaos_proxy, app_name) as pool:
        await pool.fetchval("SELECT 1")
        trigger = tls_chaos_proxy.on_client_message(b"COMMIT", action)  # type: ignore[arg-type]
        with anyio.fail_after(10):
            n = await pool.execute(f"INSERT INTO {table} VALUES ('k', 1)")
        assert n == 1
        assert trigger.count == 1
        assert pool.stats.commits_resolved == 1
        assert pool.stats.commits_unknown == 0
        assert pool.stats.retries == (0 if applied else 1)
        tls_chaos_proxy.thaw()
    assert await _count(pg, table) == 1


@pytest.mark.parametrize(("action", "applied"), COMMIT_FAULTS[:2])
async def test_transaction_commit_fault_is_resolved(
    pg: PostgresServer,
    tls_chaos_proxy: ChaosProxy,
    app_name: str,
    table: str,
    action: str,
    applied: bool,
) -> None:
    """transaction(): a lost COMMIT answer is resolved; committed -> the block succeeds,
    aborted -> ConnectionLost (a block cannot be replayed), and nothing is applied."""
    async with _pool(tls_chaos_proxy, app_name) as pool:
        await pool.fetchval("SELECT 1")
        tls_chaos_proxy.on_client_message(b"COMMIT", action)  # type: ignore[arg-type]
        if applied:
            async with pool.transaction() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
                await conn.execute(f"INSERT INTO {table} VALUES ('b', 2)")
        else:
            with pytest.raises(ConnectionLost, match="nothing was applied"):
                async with pool.transaction() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
                    await conn.execute(f"INSERT INTO {table} VALUES ('b', 2)")
        assert pool.stats.commits_resolved == 1
    assert await _count(pg, table) == (2 if applied else 0)


@pytest.mark.parametrize(("action", "applied"), COMMIT_FAULTS)
async def test_run_transaction_commit_fault(
    pg: PostgresServer,
    tls_chaos_proxy: ChaosProxy,
    app_name: str,
    table: str,
    action: str,
    applied: bool,
) -> None:
    """run_transaction(): never re-run after a resolved commit, re-run once after a
    resolved abort; the result is returned once committed."""
    calls = 0

    async def move(conn: psycopg.AsyncConnection[Any], key: str) -> str:
        nonlocal calls
        calls += 1
        await conn.execute(f"INSERT INTO {table} VALUES (%s, 1)", (key,))
        return key

    async with _pool(tls_chaos_proxy, app_name) as pool:
        await pool.fetchval("SELECT 1")
        tls_chaos_proxy.on_client_message(b"COMMIT", action)  # type: ignore[arg-type]
        with anyio.fail_after(10):
            assert await pool.run_transaction(move, "k1") == "k1"
        tls_chaos_proxy.thaw()
    assert calls == (1 if applied else 2)
    assert await _count(pg, table) == 1


async def test_in_doubt_raise(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """in_doubt="raise": a lost COMMIT answer raises CommitUnknown carrying the xid."""
    async with _pool(tls_chaos_proxy, app_name, in_doubt="raise") as pool:
        await pool.fetchval("SELECT 1")
        tls_chaos_proxy.on_client_message(b"COMMIT", "cut_after")
        with pytest.raises(CommitUnknown) as info:
            await pool.execute(f"INSERT INTO {table} VALUES ('k', 1)")
        assert isinstance(info.value.xid, int)
        assert info.value.xid > 0
        assert isinstance(info.value, psycopg.OperationalError)
        assert pool.stats.commits_unknown == 1
    # It did commit: the server is the judge, and the layer never guessed otherwise.
    assert await _count(pg, table) == 1


async def test_read_only_transaction_needs_no_resolution(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """A transaction that wrote nothing has no xid: a lost COMMIT answer is harmless."""
    async with _pool(tls_chaos_proxy, app_name) as pool:
        await pool.fetchval("SELECT 1")
        tls_chaos_proxy.on_client_message(b"COMMIT", "cut_after")
        async with pool.transaction() as conn:
            await conn.execute("SELECT 1")
        assert pool.stats.commits_resolved == 0
        assert pool.stats.connections_lost == 1


async def test_serialization_failure_is_rerun(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """run_transaction() re-runs a transaction that hit a serialization failure (40001)."""
    await pg.execute(f"INSERT INTO {table} VALUES ('counter', 0)")
    calls = 0

    async def bump(conn: psycopg.AsyncConnection[Any]) -> None:
        nonlocal calls
        calls += 1
        await conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        cur = await conn.execute(f"SELECT v FROM {table} WHERE k = 'counter'")
        row = await cur.fetchone()
        assert row is not None
        await anyio.sleep(0.05)  # let the others read the same value
        await conn.execute(f"UPDATE {table} SET v = %s WHERE k = 'counter'", (row[0] + 1,))

    async with pool_for(pg.dsn, app_name, max_size=4) as pool:
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(pool.run_transaction, bump)
        assert await pool.fetchval(f"SELECT v FROM {table} WHERE k = 'counter'") == 4
    assert calls > 4


async def test_statement_error_in_run_transaction_is_not_rerun(
    pg: PostgresServer, app_name: str
) -> None:
    """A SQL error inside run_transaction() reaches the caller after one run."""
    calls = 0

    async def bad(conn: psycopg.AsyncConnection[Any]) -> None:
        nonlocal calls
        calls += 1
        await conn.execute("SELECT 1/0")

    async with pool_for(pg.dsn, app_name, max_size=1) as pool:
        with pytest.raises(psycopg.errors.DivisionByZero):
            await pool.run_transaction(bad)
        assert await pool.fetchval("SELECT 1") == 1
        assert pool.stats.connects == 1
    assert calls == 1


async def test_swallowed_error_in_block_is_not_committed(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """A block that caught a SQL error cannot commit silently: it raises, nothing applied."""
    async with pool_for(pg.dsn, app_name, max_size=1) as pool:
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            async with pool.transaction() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
                with contextlib.suppress(psycopg.errors.DivisionByZero):
                    await conn.execute("SELECT 1/0")
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0


async def test_write_safe_fetch_returns_rows(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """fetchone(..., idempotent=False) gets execute()'s treatment and still returns the row."""
    async with _pool(tls_chaos_proxy, app_name) as pool:
        await pool.fetchval("SELECT 1")
        tls_chaos_proxy.on_client_message(b"COMMIT", "cut_before")
        row = await pool.fetchone(
            f"INSERT INTO {table} VALUES (%s, 5) RETURNING k, v", ("r",), idempotent=False
        )
        assert row == ("r", 5)
        assert pool.stats.retries == 1
    assert await _count(pg, table) == 1


async def test_statement_error_in_execute_leaves_a_clean_connection(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """A failing write is rolled back, reaches the caller untouched, and the connection
    goes back to the pool outside any transaction."""
    async with pool_for(pg.dsn, app_name, max_size=1) as pool:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            await pool.execute(f"INSERT INTO {table} VALUES ('a', %s::text::int)", ("x",))
        assert await pool.execute(f"INSERT INTO {table} VALUES ('b', 1)") == 1
        assert pool.stats.connects == 1
        assert pool.stats.retries == 0
    assert await pg.execute(f"SELECT k FROM {table}") == [("b",)]
