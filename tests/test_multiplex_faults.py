"""Multiplexed reads the way users hold them: proof that reads really share a batch,
slow reads, waits and their timeouts, close, a read inside a block, a server that
restarts or crashes with reads queued and in flight, session settings and cursor kinds
in a pipeline. Against the real server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row

from aiopg_resilient import DatabaseUnavailable, PoolClosed, PoolTimeout, RetryPolicy
from aiopg_resilient._multiplex_switch import PIPELINES_PAY
from aiopg_resilient.testing import PostgresServer

from .conftest import backends, pool_for, until

pytestmark = pytest.mark.skipif(
    not PIPELINES_PAY, reason="multiplexed reads need psycopg >= 3.3 (README)"
)

PAIR = "SELECT pg_backend_pid(), now()::text FROM pg_sleep(0.001)"


async def _pairs(pool: Any, n: int) -> list[tuple[int, str]]:
    results: list[tuple[int, str]] = []

    async def one() -> None:
        results.append(tuple(await pool.fetchone(PAIR)))  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return results


async def test_reads_in_flight_together_share_borrows_and_a_batch(
    pg: PostgresServer, app_name: str
) -> None:
    """40 reads at once over 2 connections: they share borrows (far fewer acquire events
    than reads, where without multiplexing each read borrows once) and go out together
    (the statements of one batch share one implicit transaction: the same ``now()``,
    where without multiplexing each read has its own)."""
    counts: dict[bool, int] = {}
    pairs: dict[bool, list[tuple[int, str]]] = {}
    for multiplex in (True, False):
        kinds: list[str] = []
        async with pool_for(pg.dsn, app_name, min_size=2, max_size=2, multiplex=multiplex) as pool:
            await pool.wait()
            await _pairs(pool, 40)  # the pace of the reads is learnt: short
            pool.subscribe(lambda e, seen=kinds: seen.append(e.kind), per_operation=True)
            pairs[multiplex] = await _pairs(pool, 40)
        counts[multiplex] = kinds.count("acquire")
    assert counts[False] == 40
    assert counts[True] <= 10, counts
    assert len({pid for pid, _ in pairs[True]}) <= 2
    assert len(set(pairs[True])) <= 10, sorted(set(pairs[True]))
    assert len(set(pairs[False])) == 40


async def test_slow_reads_spread_over_connections(pg: PostgresServer, app_name: str) -> None:
    """8 reads of half a second at once on max_size=8: half go direct, the others are
    shared out between the drivers (one each), so they run side by side (about 0.5 s),
    not one after another in a pipeline (2.5 s)."""
    async with pool_for(pg.dsn, app_name, min_size=8, max_size=8, multiplex=True) as pool:
        await pool.wait()
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(pool.fetchval, "SELECT %s::int FROM pg_sleep(0.5)", (i,))
        elapsed = time.monotonic() - started
    assert elapsed < 1.3, elapsed


async def _hold_all(pool: Any, held: anyio.Event, done: anyio.Event) -> None:
    async with pool.connection(), pool.connection():
        held.set()
        await done.wait()


async def test_waiting_counts_the_queued_reads_not_the_drivers(
    pg: PostgresServer, app_name: str
) -> None:
    """Both connections held; 5 reads wait (1 direct, 4 queued behind a driver that waits
    for a connection): ``stats.waiting`` is 5 all along, then everyone is answered and
    the counts are back to exact."""
    async with pool_for(pg.dsn, app_name, min_size=2, max_size=2, multiplex=True) as pool:
        await pool.wait()
        held, done = anyio.Event(), anyio.Event()
        answers: list[int] = []

        async def read(i: int) -> None:
            answers.append(await pool.fetchval("SELECT %s::int", (i,)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(_hold_all, pool, held, done)
            await held.wait()
            for i in range(5):
                tg.start_soon(read, i)
            await until(lambda: pool.stats.waiting == 5)
            for _ in range(10):
                await anyio.sleep(0.02)
                assert pool.stats.waiting == 5
            done.set()
        assert sorted(answers) == list(range(5))
        stats = pool.stats
        assert (stats.waiting, stats.in_use, stats.size, stats.idle) == (0, 0, 2, 2)


async def test_each_queued_read_times_out_on_its_own(pg: PostgresServer, app_name: str) -> None:
    """Reads queued 0.1 s apart while every connection is held: each gets a PoolTimeout
    of its own after its own acquire_timeout, as a direct read does; none waits for the
    one before it to give up first."""
    async with pool_for(
        pg.dsn, app_name, min_size=2, max_size=2, multiplex=True, acquire_timeout=0.6
    ) as pool:
        await pool.wait()
        held, done = anyio.Event(), anyio.Event()
        outcomes: dict[int, tuple[float, BaseException]] = {}

        async def read(i: int) -> None:
            started = time.monotonic()
            try:
                await pool.fetchval("SELECT 1")
            except PoolTimeout as exc:
                outcomes[i] = (time.monotonic() - started, exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(_hold_all, pool, held, done)
            await held.wait()
            for i in range(6):
                tg.start_soon(read, i)
                await anyio.sleep(0.1)
            await until(lambda: len(outcomes) == 6)
            done.set()
        waits = [wait for wait, _ in outcomes.values()]
        assert all(0.5 <= wait <= 1.0 for wait in waits), waits
        assert len({id(exc) for _, exc in outcomes.values()}) == 6
        assert pool.stats.waiting == 0
        assert await pool.fetchval("SELECT 2") == 2


async def test_close_fails_each_queued_read_with_its_own_pool_closed(
    pg: PostgresServer, app_name: str
) -> None:
    """close() with reads queued: each gets a PoolClosed of its own at once, no driver
    waits on, nothing stays open on the server."""
    pool = pool_for(pg.dsn, app_name, min_size=2, max_size=2, multiplex=True)
    await pool.open(wait=True, timeout=5)
    held, done = anyio.Event(), anyio.Event()
    errors: list[BaseException] = []

    async def read() -> None:
        try:
            await pool.fetchval("SELECT 1")
        except PoolClosed as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold_all, pool, held, done)
        await held.wait()
        for _ in range(6):
            tg.start_soon(read)
        await until(lambda: pool.stats.waiting == 6)
        with anyio.fail_after(2):
            await pool.close()
        await until(lambda: len(errors) == 6)
        done.set()
    assert len({id(exc) for exc in errors}) == 6
    mux = pool._multiplexer
    assert mux is not None
    await until(lambda: not mux._running)
    await until(lambda: pool.stats.size == 0)


async def test_a_read_inside_a_block_keeps_the_blocks_rules(
    pg: PostgresServer, app_name: str
) -> None:
    """Reads are queued (the pool is busy) when a task that holds the only connection in
    a block reads through the pool: it is told at once, as without multiplexing, instead
    of waiting in the queue for the connection it holds itself."""
    async with pool_for(
        pg.dsn, app_name, min_size=1, max_size=1, multiplex=True, acquire_timeout=10
    ) as pool:
        await pool.wait()
        inside = anyio.Event()

        async def other_task_reads() -> None:
            await inside.wait()
            assert await pool.fetchval("SELECT 1") == 1

        async with anyio.create_task_group() as tg:
            for _ in range(3):  # started outside the block: they hold nothing
                tg.start_soon(other_task_reads)
            async with pool.transaction() as conn:
                inside.set()
                await until(lambda: pool.stats.waiting == 3)
                with anyio.fail_after(2), pytest.raises(psycopg.ProgrammingError, match="holds"):
                    await pool.fetchval("SELECT 1")
                await conn.execute("SELECT 1")
        assert pool.stats.waiting == 0


async def test_queued_reads_while_the_server_is_down_then_back(
    pg: PostgresServer, app_name: str
) -> None:
    """The server is down with 12 reads in flight at once: each gets a
    DatabaseUnavailable of its own when its budget is spent; once it is back, reads
    work and the counts are exact."""
    policy = RetryPolicy(timeout=1.5)
    async with pool_for(
        pg.dsn, app_name, min_size=2, max_size=2, multiplex=True, retry=policy
    ) as pool:
        await pool.wait()
        await pg.stop("immediate")
        errors: list[tuple[float, BaseException]] = []

        async def read() -> None:
            started = time.monotonic()
            try:
                await pool.fetchval("SELECT 1")
            except DatabaseUnavailable as exc:
                errors.append((time.monotonic() - started, exc))

        try:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for _ in range(12):
                        tg.start_soon(read)
        finally:
            await pg.start()
        assert len(errors) == 12
        assert len({id(exc) for _, exc in errors}) == 12
        assert max(wait for wait, _ in errors) < 1.5 + 2.0
        with anyio.fail_after(10):
            assert await pool.fetchval("SELECT 3") == 3
        await until(lambda: pool.stats.waiting == 0 and pool.stats.in_use == 0)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_reads_queued_and_in_flight_survive_a_restart_and_a_crash(
    pg: PostgresServer, app_name: str, mode: str
) -> None:
    """32 readers over 4 connections loop on checked reads while the server restarts
    (``fast``) or crashes and comes back (``immediate``): no reader sees an error, every
    answer is its own."""
    async with pool_for(pg.dsn, app_name, min_size=2, max_size=4, multiplex=True) as pool:
        await pool.wait()
        stop = anyio.Event()
        wrong: list[object] = []
        counts = [0] * 32

        async def reader(k: int) -> None:
            i = 0
            while not stop.is_set():
                n = k * 100_000 + i
                got = await pool.fetchval("SELECT %s::int", (n,))
                if got != n:
                    wrong.append((n, got))
                counts[k] += 1
                i += 1

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for k in range(32):
                    tg.start_soon(reader, k)
                await anyio.sleep(0.5)
                await pg.restart(mode)  # type: ignore[arg-type]
                before = sum(counts)
                await until(lambda: sum(counts) > before + 500, timeout=30)
                stop.set()
        assert wrong == []
        assert min(counts) > 0
        assert pool.stats.connections_lost >= 1
        await until(lambda: pool.stats.in_use == 0 and pool.stats.waiting == 0)


async def test_session_settings_row_factories_and_raw_cursors_in_a_pipeline(
    pg: PostgresServer, app_name: str
) -> None:
    """What users put through reads, many at once: a ``SET`` in configure is seen by
    every pipelined read; ``dict_row`` shapes fetch/fetchone; a raw cursor factory takes
    ``$1`` placeholders; a statement_timeout cancels the slow read only."""

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SET search_path TO pg_catalog, public")
        await conn.execute("SET statement_timeout = '300ms'")

    async with pool_for(
        pg.dsn,
        app_name,
        min_size=2,
        max_size=2,
        multiplex=True,
        configure=configure,
        connect_kwargs={"row_factory": dict_row},
    ) as pool:
        await pool.wait()
        paths: list[object] = []
        rows: list[object] = []
        timeouts: list[BaseException] = []

        async def path() -> None:
            paths.append(await pool.fetchval("SELECT current_setting('search_path')"))

        async def row(i: int) -> None:
            rows.append(await pool.fetchone("SELECT %s::int AS n", (i,)))

        async def slow() -> None:
            try:
                await pool.fetchval("SELECT pg_sleep(2)")
            except psycopg.errors.QueryCanceled as exc:
                timeouts.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            for i in range(20):
                tg.start_soon(path)
                tg.start_soon(row, i)
        assert paths == ["pg_catalog, public"] * 20
        assert sorted(rows, key=lambda r: r["n"]) == [{"n": i} for i in range(20)]  # type: ignore[index]
        assert len(timeouts) == 1

    async with pool_for(
        pg.dsn,
        app_name,
        min_size=2,
        max_size=2,
        multiplex=True,
        connect_kwargs={"cursor_factory": psycopg.AsyncRawCursor},
    ) as pool:
        await pool.wait()
        got: list[int] = []

        async def raw(i: int) -> None:
            got.append(await pool.fetchval("SELECT $1::int", (i,)))

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(raw, i)
        assert sorted(got) == list(range(30))
    assert await backends(pg, app_name) == 0


async def test_a_read_the_client_refuses_reaches_its_caller_only(
    pg: PostgresServer, app_name: str
) -> None:
    """Reads psycopg refuses before sending (a wrong number of parameters, a parameter no
    dumper adapts) in the middle of batches: each caller gets its own error at once, no
    other caller notices, no connection is dropped."""
    async with pool_for(pg.dsn, app_name, min_size=2, max_size=2, multiplex=True) as pool:
        await pool.wait()

        async def read(i: int) -> object:
            if i % 10 == 3:
                return await pool.fetchval("SELECT %s::int", (i, i))  # one too many
            if i % 10 == 7:
                return await pool.fetchval("SELECT %s", (object(),))  # cannot be adapted
            return await pool.fetchval("SELECT %s::int", (i,))

        with anyio.fail_after(10):
            results = await asyncio.gather(*(read(i) for i in range(60)), return_exceptions=True)
        for i, result in enumerate(results):
            if i % 10 in (3, 7):
                assert isinstance(result, psycopg.ProgrammingError), (i, result)
            else:
                assert result == i, (i, result)
        assert len({id(r) for r in results if isinstance(r, BaseException)}) == 12
        stats = pool.stats
        assert (stats.connections_lost, stats.retries, stats.in_use) == (0, 0, 0)


async def test_backends_terminated_under_pipelined_reads(pg: PostgresServer, app_name: str) -> None:
    """pg_terminate_backend on every connection of the pool, three times, while 32 tasks
    loop on pipelined reads (the server's 57P01 arrives in the middle of a batch): no
    reader sees an error."""
    async with pool_for(pg.dsn, app_name, min_size=2, max_size=4, multiplex=True) as pool:
        await pool.wait()
        stop = anyio.Event()
        errors: list[BaseException] = []
        done = 0

        async def reader(k: int) -> None:
            nonlocal done
            while not stop.is_set():
                try:
                    got = await pool.fetchval("SELECT %s::int FROM pg_sleep(0.005)", (k,))
                    assert got == k
                    done += 1
                except Exception as exc:
                    errors.append(exc)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for k in range(32):
                    tg.start_soon(reader, k)
                for _ in range(3):
                    await anyio.sleep(0.3)
                    assert await pg.terminate_backends(app_name) >= 1
                await anyio.sleep(0.3)
                stop.set()
        assert errors == []
        assert done > 100
        assert pool.stats.connections_lost >= 3


async def test_a_write_through_fetchval_is_never_rolled_back_by_a_neighbour(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """``fetchval("INSERT ... RETURNING")`` and ``nextval`` (writes users put through
    the read calls) amid reads that fail: a batch is one implicit transaction, so a
    neighbour's error would roll a write in it back after its caller had its answer.
    Every write is applied exactly once and returns its own key; the failing reads get
    their own errors; the others their answers."""
    await pg.execute("CREATE SEQUENCE IF NOT EXISTS mux_seq")
    async with pool_for(pg.dsn, app_name, min_size=2, max_size=2, multiplex=True) as pool:
        await pool.wait()

        async def call(i: int) -> object:
            if i % 4 == 0:
                return await pool.fetchval(
                    f"INSERT INTO {table} VALUES (%s, 1) RETURNING k", (f"w{i}",)
                )
            if i % 4 == 1:
                return await pool.fetchval("SELECT 1 / %s::int", (0,))
            if i % 4 == 2:
                return await pool.fetchval("SELECT nextval('mux_seq')")
            return await pool.fetchval("SELECT %s::int", (i,))

        for _ in range(3):
            with anyio.fail_after(20):
                results = await asyncio.gather(
                    *(call(i) for i in range(80)), return_exceptions=True
                )
            for i, result in enumerate(results):
                if i % 4 == 0:
                    assert result == f"w{i}", (i, result)
                elif i % 4 == 1:
                    assert isinstance(result, psycopg.errors.DivisionByZero), (i, result)
                elif i % 4 == 2:
                    assert isinstance(result, int), (i, result)
                else:
                    assert result == i, (i, result)
            nexts = [r for i, r in enumerate(results) if i % 4 == 2]
            assert len(set(nexts)) == 20
    rows = await pg.execute(f"SELECT k, count(*) FROM {table} GROUP BY k")
    assert {k: int(c) for k, c in rows} == {f"w{i}": 3 for i in range(0, 80, 4)}
