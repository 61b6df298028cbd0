"""Multiplexed reads (``multiplex=True``): reads in flight together share connections in
pipeline mode, and every guarantee of a read holds, against the real server."""

from __future__ import annotations

import asyncio
import time

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row

from aiopg_resilient import ResilientPool
from aiopg_resilient._multiplex_switch import ENV, PIPELINES_PAY
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import pool_for

pytestmark = pytest.mark.skipif(
    not PIPELINES_PAY, reason="multiplexed reads need psycopg >= 3.3 (README)"
)

TASKS = 48


async def _server_connections(pg: PostgresServer, app_name: str) -> int:
    rows = await pg.execute(
        f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app_name}'"
    )
    return int(rows[0][0])


async def test_reads_share_connections_and_each_gets_its_own_answer(
    pg: PostgresServer, app_name: str
) -> None:
    """48 readers over 2 connections: every answer is the caller's own, in the user's
    row factory for fetch/fetchone and the value itself for fetchval; the server sees
    no more than max_size connections; the pool's counts are exact after."""
    kwargs = {"row_factory": dict_row}
    async with pool_for(
        pg.dsn, app_name, min_size=2, max_size=2, multiplex=True, connect_kwargs=kwargs
    ) as pool:
        await pool.wait()
        seen: list[tuple[int, object, object, object]] = []

        async def reader(k: int) -> None:
            for i in range(20):
                n = k * 1000 + i
                value = await pool.fetchval("SELECT %s::int AS n", (n,))
                row = await pool.fetchone("SELECT %s::int AS n", (n,))
                rows = await pool.fetch(
                    "SELECT g AS n FROM generate_series(%s::int, %s) g", (n, n + 1)
                )
                seen.append((n, value, row, rows))

        async with anyio.create_task_group() as tg:
            for k in range(TASKS):
                tg.start_soon(reader, k)
            await anyio.sleep(0.05)
            assert await _server_connections(pg, app_name) <= 2
        assert len(seen) == TASKS * 20
        for n, value, row, rows in seen:
            assert value == n
            assert row == {"n": n}
            assert rows == [{"n": n}, {"n": n + 1}]
        stats = pool.stats
        assert (stats.size, stats.in_use, stats.connections_lost) == (2, 0, 0)


async def test_one_callers_sql_error_reaches_that_caller_only(
    pg: PostgresServer, app_name: str
) -> None:
    """A SQL error aborts the rest of a pipeline batch: its caller gets its own error,
    every other caller its answer (those after it are sent again); no connection lost."""
    async with pool_for(pg.dsn, app_name, min_size=1, max_size=2, multiplex=True) as pool:
        await pool.wait()
        for _ in range(5):
            calls = [
                pool.fetchval("SELECT 1 / %s::int + %s", (0 if i % 7 == 3 else 1, i))
                for i in range(40)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            for i, result in enumerate(results):
                if i % 7 == 3:
                    assert isinstance(result, psycopg.errors.DivisionByZero), (i, result)
                else:
                    assert result == 1 + i, (i, result)
        stats = pool.stats
        assert (stats.in_use, stats.connections_lost, stats.retries) == (0, 0, 0)
        assert await pool.fetchval("SELECT 42") == 42


async def test_a_lost_connection_replays_every_read_in_flight(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """Reads in flight on a pipelined connection that is cut: each is replayed on a
    fresh connection; no caller sees an error, every answer is right."""
    assert chaos_proxy.dsn is not None
    async with pool_for(chaos_proxy.dsn, app_name, min_size=2, max_size=2, multiplex=True) as pool:
        await pool.wait()
        calls = [pool.fetchval("SELECT %s::int FROM pg_sleep(0.02)", (i,)) for i in range(32)]
        gathered = asyncio.gather(*calls, return_exceptions=True)
        await anyio.sleep(0.2)
        assert chaos_proxy.cut() >= 1
        with anyio.fail_after(10):
            results = await gathered
        assert results == list(range(32))
        assert pool.stats.connections_lost >= 1
        assert pool.stats.in_use == 0


async def test_a_cancelled_caller_disturbs_no_one_and_leaks_nothing(
    pg: PostgresServer, app_name: str
) -> None:
    """Half the callers give up mid-pipeline (their own deadline): the others get their
    answers, nothing leaks, the pool works on."""
    async with pool_for(pg.dsn, app_name, min_size=2, max_size=2, multiplex=True) as pool:
        await pool.wait()
        answers: dict[int, object] = {}
        gave_up: list[int] = []

        async def caller(i: int) -> None:
            delay = 0.1 if i % 2 else 5.0
            with anyio.move_on_after(delay) as scope:
                answers[i] = await pool.fetchval("SELECT %s::int FROM pg_sleep(0.02)", (i,))
            if scope.cancelled_caught:
                gave_up.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(caller, i)
        assert sorted(gave_up) == list(range(1, 40, 2))
        assert answers == {i: i for i in range(0, 40, 2)}
        with anyio.fail_after(5):
            assert await pool.fetchval("SELECT 7") == 7
        assert pool.stats.in_use == 0
        assert await _server_connections(pg, app_name) <= 2


async def test_a_silent_path_with_reads_in_flight_is_replayed(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """A pipelined batch whose connection goes silent (a proxy holds the bytes) is
    looked at like any statement after heartbeat_timeout and replayed on a fresh
    connection: every caller gets its answer well before its own deadline."""
    assert chaos_proxy.dsn is not None
    async with pool_for(
        chaos_proxy.dsn, app_name, min_size=1, max_size=2, multiplex=True, heartbeat_timeout=1.0
    ) as pool:
        await pool.wait()
        calls = [pool.fetchval("SELECT %s::int FROM pg_sleep(0.02)", (i,)) for i in range(24)]
        gathered = asyncio.gather(*calls)
        await anyio.sleep(0.05)
        chaos_proxy.freeze()
        started = time.monotonic()
        with anyio.fail_after(15):
            assert await gathered == list(range(24))
        assert time.monotonic() - started < 10
        chaos_proxy.thaw()


async def test_writes_blocks_and_a_lone_read_keep_a_connection_of_their_own(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """With reads flooding, execute() and transaction() run on connections of their own
    (a temporary table made in a block is seen by the block only); a lone read takes
    the direct path."""
    async with pool_for(pg.dsn, app_name, min_size=2, max_size=4, multiplex=True) as pool:
        await pool.wait()
        stop = anyio.Event()

        async def flood() -> None:
            while not stop.is_set():
                await pool.fetchval("SELECT 1")

        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(flood)
            for i in range(20):
                assert await pool.execute(f"INSERT INTO {table} (v) VALUES (%s)", (i,)) == 1
                async with pool.transaction() as conn:
                    await conn.execute("CREATE TEMP TABLE mine (x int) ON COMMIT DROP")
                    await conn.execute("INSERT INTO mine VALUES (1)")
                    cur = await conn.execute("SELECT count(*) FROM mine")
                    assert await cur.fetchone() == (1,)
            stop.set()
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 20
        assert pool.stats.in_use == 0


def test_the_switch_and_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by default; ``AIOPG_RESILIENT_MULTIPLEX=1`` turns it on when the argument is
    not given; the argument wins."""
    monkeypatch.delenv(ENV, raising=False)
    assert ResilientPool("dbname=x")._ops.multiplexer is None
    assert ResilientPool("dbname=x", multiplex=True)._ops.multiplexer is not None
    monkeypatch.setenv(ENV, "1")
    assert ResilientPool("dbname=x")._ops.multiplexer is not None
    assert ResilientPool("dbname=x", multiplex=False)._ops.multiplexer is None
