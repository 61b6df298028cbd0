"""Guarantee 5: callers cancelled at any await leak nothing and leave exact counts."""

from __future__ import annotations

import random

import anyio
import pytest
from psycopg.pq import TransactionStatus

from aiopg_resilient import CommitUnknown, ConnectionLost, ResilientPool
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import backends, pool_for, until, until_value

pytestmark = pytest.mark.slow


async def _assert_quiet_and_exact(pool: ResilientPool, pg: PostgresServer, app_name: str) -> None:
    # Quiet: no connect in flight, no heartbeat ping holding a connection. A connection
    # leaked by a cancelled caller would keep in_use above 0 and fail this wait.
    await until(lambda: pool.stats.connecting == 0 and pool.stats.in_use == 0, timeout=10)
    s = pool.stats
    assert s.waiting == 0
    assert s.size == s.idle
    for slot in list(pool._idle):
        assert slot.conn.pgconn.transaction_status == TransactionStatus.IDLE
        assert slot.conn.autocommit
    # The server agrees: exactly the pool's connections, nothing leaked. (Compared on
    # every check: the pool may still be replacing a connection the faults killed.)
    with anyio.fail_after(10):
        while await backends(pg, app_name) != pool.stats.size or pool.stats.connecting:
            await anyio.sleep(0.02)


async def test_random_cancellations_leak_nothing(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """Hundreds of calls cancelled at random points (connect, acquire, query, backoff,
    inside a transaction) leave the pool's counts exact and no backend leaked."""
    assert chaos_proxy.dsn is not None
    chaos_proxy.set_latency(0.001)
    rng = random.Random(7)
    cancelled = unknown = 0
    async with pool_for(
        chaos_proxy.dsn,
        app_name,
        min_size=2,
        max_size=6,
        heartbeat_interval=0.05,
        heartbeat_timeout=0.5,
    ) as pool:

        async def one(i: int) -> None:
            nonlocal cancelled, unknown
            with anyio.move_on_after(rng.uniform(0.0, 0.03)) as scope:
                kind = i % 4
                if kind == 0:
                    await pool.fetchval("SELECT pg_sleep(0.005)")
                elif kind == 1:
                    # A block cannot be replayed: a fault inside it is ConnectionLost. A
                    # cancel while its COMMIT is out is CommitUnknown (guarantee 13).
                    try:
                        async with pool.connection() as conn:
                            await conn.execute(f"INSERT INTO {table} VALUES ('c', 1)")
                            await conn.execute("SELECT pg_sleep(0.01)")
                    except ConnectionLost:
                        pass
                    except CommitUnknown as exc:
                        unknown += exc.xid is not None
                elif kind == 2:
                    await pool.execute(f"INSERT INTO {table} VALUES ('e', 1)", idempotent=True)
                else:
                    await pool.check()
            cancelled += scope.cancelled_caught

        async def faults() -> None:
            for n in range(6):
                await anyio.sleep(0.25)
                if n == 2:
                    await pg.restart("fast")
                elif n % 2:
                    await anyio.to_thread.run_sync(chaos_proxy.reset)
                else:
                    await pg.terminate_backends(application_name=app_name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(faults)
            for i in range(600):
                tg.start_soon(one, i)
                if i % 20 == 0:
                    await anyio.sleep(0.05)
        assert cancelled + unknown >= 100
        await _assert_quiet_and_exact(pool, pg, app_name)
        assert await pool.fetchval("SELECT 1") == 1
    await until_value(lambda: backends(pg, app_name), 0, timeout=5)


async def test_cancel_during_backoff_and_connect(pg: PostgresServer, app_name: str) -> None:
    """Callers cancelled while the server is down (waiting on the single-flight probe)
    return at once and leave no waiter behind."""
    async with pool_for(pg.dsn, app_name, min_size=1, max_size=4) as pool:
        await pg.stop("immediate")
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(_fetch_with_deadline, pool, 0.3)
            assert pool.stats.waiting == 0
            assert pool.stats.down
        finally:
            await pg.start()
        with anyio.fail_after(3):
            assert await pool.fetchval("SELECT 1") == 1
        await _assert_quiet_and_exact(pool, pg, app_name)


async def _fetch_with_deadline(pool: ResilientPool, deadline: float) -> None:
    with anyio.move_on_after(deadline) as scope:
        await pool.fetchval("SELECT 1")
    assert scope.cancelled_caught
