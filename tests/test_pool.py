"""ResilientPool basics against the real server: API, sizes, timeouts, heartbeat."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import psycopg
import pytest

from aiopg_resilient import (
    PoolClosed,
    PoolTimeout,
    ResilientPool,
    RetryPolicy,
)
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import backends, pool_for, until, until_value


async def test_read_helpers(pg: PostgresServer, app_name: str) -> None:
    """fetch, fetchone, fetchval and execute return rows, a row, a value and a rowcount."""
    async with pool_for(pg.dsn, app_name) as pool:
        assert await pool.fetch("SELECT g FROM generate_series(1, 3) g") == [(1,), (2,), (3,)]
        assert await pool.fetchone("SELECT 1, 'a'") == (1, "a")
        assert await pool.fetchone("SELECT 1 WHERE false") is None
        assert await pool.fetchval("SELECT %s::int + 1", (41,)) == 42
        assert await pool.fetchval("SELECT 1 WHERE false") is None
        assert await pool.execute("SELECT generate_series(1, 5)") == 5
        assert await pool.fetchval("SHOW ssl") == "on"


async def test_stats_are_exact(pg: PostgresServer, app_name: str) -> None:
    """PoolStats counts idle/in-use connections and waiters exactly."""
    async with pool_for(pg.dsn, app_name, min_size=2, max_size=3) as pool:
        await until(lambda: pool.stats.size == 2)
        s = pool.stats
        assert (s.size, s.idle, s.in_use, s.waiting, s.connecting) == (2, 2, 0, 0, 0)
        async with pool.connection(), pool.connection():
            s = pool.stats
            assert (s.size, s.idle, s.in_use) == (2, 0, 2)
        assert pool.stats.idle == 2
        assert await backends(pg, app_name) == 2
    assert pool.stats.size == 0
    await until_value(lambda: backends(pg, app_name), 0)


async def test_sql_error_goes_to_caller_and_connection_stays(
    pg: PostgresServer, app_name: str
) -> None:
    """A statement error reaches the caller untouched; no reconnect, no retry."""
    async with pool_for(pg.dsn, app_name, min_size=1, max_size=1) as pool:
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(psycopg.errors.DivisionByZero):
            await pool.fetchval("SELECT 1/0")
        with pytest.raises(psycopg.errors.UndefinedTable):
            await pool.execute("INSERT INTO no_such_table VALUES (1)")
        with pytest.raises(psycopg.errors.SyntaxError):
            await pool.fetch("SELEC 1")
        assert await pool.fetchval("SELECT pg_backend_pid()") == pid
        s = pool.stats
        assert (s.connects, s.retries, s.connections_lost) == (1, 0, 0)


async def test_acquire_timeout(pg: PostgresServer, app_name: str) -> None:
    """With every connection busy, a caller waits acquire_timeout then gets PoolTimeout."""
    async with pool_for(pg.dsn, app_name, min_size=1, max_size=1, acquire_timeout=0.3) as pool:
        held, done = anyio.Event(), anyio.Event()

        async def hold() -> None:  # another task holds the one connection
            async with pool.connection():
                held.set()
                await done.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await held.wait()
            t0 = time.monotonic()
            with pytest.raises(PoolTimeout, match="no connection free"):
                await pool.fetchval("SELECT 1")
            assert 0.25 <= time.monotonic() - t0 < 2.0
            done.set()
        assert pool.stats.acquire_timeouts == 1
        assert pool.stats.waiting == 0
        assert await pool.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("multiplex", [False, True])
async def test_grows_to_max_size_and_no_further(
    pg: PostgresServer, app_name: str, multiplex: bool
) -> None:
    """Concurrent callers grow the pool up to max_size, never beyond. With multiplexed
    reads, reads share connections: never beyond max_size either, and maybe fewer."""
    async with pool_for(pg.dsn, app_name, min_size=0, max_size=4, multiplex=multiplex) as pool:
        peak = 0

        async def worker() -> None:
            nonlocal peak
            for _ in range(5):
                await pool.fetchval("SELECT pg_sleep(0.01)")
                peak = max(peak, pool.stats.size)

        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(worker)
        assert peak == 4 if not multiplex else 1 <= peak <= 4
        assert await backends(pg, app_name) == pool.stats.size <= 4


async def test_configure_runs_on_every_new_connection(pg: PostgresServer, app_name: str) -> None:
    """configure() sets session state on each new connection, reconnects included."""
    seen: list[int] = []

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SET statement_timeout = '4s'")
        seen.append(conn.info.backend_pid)

    async with pool_for(pg.dsn, app_name, max_size=1, configure=configure) as pool:
        assert await pool.fetchval("SHOW statement_timeout") == "4s"
        await pg.terminate_backends(application_name=app_name)
        assert await pool.fetchval("SHOW statement_timeout") == "4s"
        assert len(seen) == 2


async def test_connection_block_commits_and_rolls_back(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """connection() commits on clean exit, rolls back on error, and keeps the connection."""
    async with pool_for(pg.dsn, app_name, max_size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
        with pytest.raises(RuntimeError, match="app bug"):
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES ('b', 2)")
                raise RuntimeError("app bug")
        assert await pool.fetch(f"SELECT k FROM {table}") == [("a",)]
        assert pool.stats.connects == 1


async def test_closed_pool_raises(pg: PostgresServer, app_name: str) -> None:
    """Using a pool that is closed or never opened raises PoolClosed."""
    pool = pool_for(pg.dsn, app_name)
    with pytest.raises(PoolClosed):
        await pool.fetchval("SELECT 1")
    async with pool:
        pass
    with pytest.raises(PoolClosed):
        await pool.fetchval("SELECT 1")
    with pytest.raises(PoolClosed):
        await pool.open()


async def test_max_idle_trims_above_min_size(pg: PostgresServer, app_name: str) -> None:
    """Idle connections above min_size are closed after max_idle."""
    async with pool_for(pg.dsn, app_name, min_size=1, max_size=4, max_idle=0.3) as pool:
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(pool.fetchval, "SELECT pg_sleep(0.05)")
        assert pool.stats.size == 4
        await until(lambda: pool.stats.size == 1, timeout=5)


async def test_max_lifetime_replaces_connections(pg: PostgresServer, app_name: str) -> None:
    """A connection past its (jittered) lifetime is replaced, not reused."""
    async with pool_for(pg.dsn, app_name, min_size=1, max_size=1, max_lifetime=0.3) as pool:
        first = await pool.fetchval("SELECT pg_backend_pid()")
        await anyio.sleep(0.4)
        assert await pool.fetchval("SELECT pg_backend_pid()") != first


async def test_heartbeat_replaces_a_frozen_connection(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """A half-open idle connection is found by the heartbeat timeout and replaced."""
    assert chaos_proxy.dsn is not None
    async with pool_for(
        chaos_proxy.dsn,
        app_name,
        min_size=1,
        max_size=1,
        heartbeat_interval=0.2,
        heartbeat_timeout=0.3,
    ) as pool:
        old = await pool.fetchval("SELECT pg_backend_pid()")
        await anyio.to_thread.run_sync(chaos_proxy.freeze)
        await until(lambda: pool.stats.heartbeat_failures >= 1, timeout=5)
        await anyio.to_thread.run_sync(chaos_proxy.thaw)
        with anyio.fail_after(5):
            new = await pool.fetchval("SELECT pg_backend_pid()")
        assert new != old
        assert pool.stats.connections_lost >= 1


async def test_one_loss_checks_the_others(pg: PostgresServer, app_name: str) -> None:
    """After a restart, one dead connection makes the pool drop every dead idle one at once."""
    async with pool_for(pg.dsn, app_name, min_size=4, max_size=4) as pool:
        await until(lambda: pool.stats.size == 4)
        await pg.terminate_backends(application_name=app_name)
        await anyio.sleep(0.1)  # let the FATAL messages arrive
        assert await pool.fetchval("SELECT 1") == 1
        # The first checkout found them dead locally: no query failed, nothing retried.
        assert pool.stats.retries == 0
        assert pool.stats.connections_lost == 4


async def test_check_pings_idle_connections(pg: PostgresServer, app_name: str) -> None:
    """check() runs a heartbeat over every idle connection now."""
    async with pool_for(pg.dsn, app_name, min_size=2, heartbeat_interval=None) as pool:
        await until(lambda: pool.stats.size == 2)
        await pool.check()
        assert pool.stats.heartbeats == 2
        assert pool.stats.idle == 2


async def test_run_heartbeat_in_own_task_group(pg: PostgresServer, app_name: str) -> None:
    """run_heartbeat() lets the application own the heartbeat task."""
    async with (
        pool_for(pg.dsn, app_name, min_size=1, heartbeat_interval=0.1, heartbeat_timeout=1) as pool,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(pool.run_heartbeat)
        await until(lambda: pool.stats.heartbeats >= 2, timeout=5)
        tg.cancel_scope.cancel()


async def test_write_lost_before_commit_is_rerun_once(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """A write whose connection dies mid-statement (before COMMIT) was not applied, so
    execute() re-runs it: exactly one row."""
    assert chaos_proxy.dsn is not None
    async with pool_for(chaos_proxy.dsn, app_name, max_size=1) as pool:
        await pool.fetchval("SELECT 1")

        async def cut_soon() -> None:
            await anyio.sleep(0.2)
            await anyio.to_thread.run_sync(chaos_proxy.reset)

        async with anyio.create_task_group() as tg:
            tg.start_soon(cut_soon)
            n = await pool.execute(f"INSERT INTO {table} SELECT 'x', 1 FROM pg_sleep(0.5)")
        assert n == 1
        assert pool.stats.retries == 1
    assert await pg.execute(f"SELECT count(*) FROM {table}") == [(1,)]


async def test_statement_outside_transaction_block_runs_once(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """Statements that refuse a transaction block (VACUUM) still run through execute()."""
    async with pool_for(pg.dsn, app_name, max_size=1) as pool:
        await pool.execute(f"VACUUM {table}")
        assert pool.stats.connects == 1


async def test_idempotent_execute_is_replayed(pg: PostgresServer, app_name: str) -> None:
    """execute(idempotent=True) is replayed like a read after a connection loss."""
    async with pool_for(pg.dsn, app_name, max_size=1) as pool:
        await pool.fetchval("SELECT 1")

        async def kill_soon() -> None:
            await anyio.sleep(0.2)
            await pg.terminate_backends(application_name=app_name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_soon)
            assert await pool.execute("SELECT pg_sleep(0.5)", idempotent=True) == 1
        assert pool.stats.retries == 1


async def test_no_password_in_repr_stats_or_logs(
    pg: PostgresServer, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The password never shows in repr, stats, log lines or errors."""
    caplog.set_level(logging.DEBUG, logger="aiopg_resilient")
    pool = pool_for(pg.dsn, app_name, max_size=1, retry=RetryPolicy(timeout=0.5))
    async with pool:
        await pg.terminate_backends(application_name=app_name)
        await pool.fetchval("SELECT 1")
        texts = [repr(pool), str(pool.stats), caplog.text]
    bad = ResilientPool(pg.conninfo(password="not-the-" + pg.password), name=app_name)
    with pytest.raises(psycopg.OperationalError) as info:
        await bad.open()
    texts += [repr(bad), str(bad.stats), str(info.value), caplog.text]
    for text in texts:
        assert pg.password not in text


def test_multiplexed_reads_fall_back_on_an_old_psycopg(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On psycopg 3.2 (pipeline mode slower than a connection per read, measured),
    ``multiplex=True`` warns once and reads take a connection each; on 3.3 it is on."""
    from aiopg_resilient import _multiplex_switch

    for pays in (False, True):
        monkeypatch.setattr(_multiplex_switch, "PIPELINES_PAY", pays)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="aiopg_resilient.pool"):
            pool = ResilientPool("dbname=x", name="old", multiplex=True)
        assert (pool._multiplexer is not None) is pays
        warned = [r.getMessage() for r in caplog.records if "psycopg >= 3.3" in r.getMessage()]
        assert len(warned) == (0 if pays else 1), warned
