"""Guarantees 2, 12 and 13 where the in-doubt protocol is pushed hardest: another cluster
behind the same address, a COMMIT the server is still working on (synchronous
replication with the standby gone), a saturated pool, an outage during resolution, and
a caller that gives up while its COMMIT is out.
"""

from __future__ import annotations

import logging
import time

import anyio
import pytest

from aiopg_resilient import (
    CommitUnknown,
    DatabaseUnavailable,
    PoolTimeout,
    ResilientPool,
    RetryPolicy,
)
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import pool_for, until, until_value

pytestmark = pytest.mark.slow

_HELD = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    " AND state = 'idle in transaction' AND backend_xid IS NOT NULL"
)
_SYNCREP = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event = 'SyncRep'"
)


async def _count(pg: PostgresServer, table: str) -> int:
    return int((await pg.execute(f"SELECT count(*) FROM {table}"))[0][0])


async def _scalar(pg: PostgresServer, query: str, *params: object) -> int:
    return int((await pg.execute(query, params))[0][0])


async def _insert_a(pool: ResilientPool, table: str, outcome: list[BaseException | int]) -> None:
    """execute() one INSERT; what it returned or raised goes into *outcome*."""
    try:
        outcome.append(await pool.execute(f"INSERT INTO {table} VALUES ('a', 1)"))
    except Exception as exc:
        outcome.append(exc)


async def test_another_cluster_behind_the_same_address_is_commit_unknown(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """Guarantee 12: the id was learnt on one cluster, the COMMIT's answer lost, and a
    fresh cluster (same address, port, credentials and timeline 1) answers the
    resolution: CommitUnknown with the id, never committed, never re-run."""
    assert tls_chaos_proxy.dsn is not None
    pool = pool_for(tls_chaos_proxy.dsn, app_name, max_size=2, heartbeat_timeout=10.0)
    async with pool:
        await pool.fetchval("SELECT 1")
        trigger = tls_chaos_proxy.on_client_message(b"COMMIT", "freeze_before")
        outcome: list[BaseException | int] = []

        async with anyio.create_task_group() as tg:
            tg.start_soon(_insert_a, pool, table, outcome)
            await trigger.wait()
            await until_value(lambda: _scalar(pg, _HELD, app_name), 1, timeout=5)
            before = await _scalar(pg, "SELECT system_identifier FROM pg_control_system()")
            await pg.recreate()  # the old backend dies with its cluster
            # Something of the new cluster's own commits with low ids.
            await pg.execute(f"CREATE TABLE {table} (k text, v int)")
            for n in range(5):
                await pg.execute(f"INSERT INTO {table} VALUES ('theirs', %s)", (n,))
            tls_chaos_proxy.thaw()
        after = await _scalar(pg, "SELECT system_identifier FROM pg_control_system()")
        assert after != before
        assert len(outcome) == 1
        error = outcome[0]
        assert isinstance(error, CommitUnknown), error
        assert error.xid is not None
        assert "another cluster" in str(error)
        assert pool.stats.commits_unknown == 1
    rows = await pg.execute(f"SELECT k FROM {table} WHERE k = 'a'")
    assert rows == []  # not re-run on the new cluster


async def test_syncrep_commit_is_never_cut_and_deadline_gives_commit_unknown(
    pg: PostgresServer, app_name: str, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Guarantees 2 and 13: a COMMIT waiting for a synchronous standby is waited for,
    never cancelled nor terminated, past heartbeat_timeout; the caller's own deadline
    gives CommitUnknown with the id (and a WARNING naming it), never success; once the
    standby is back the COMMIT completes, and the row is there exactly once."""
    caplog.set_level(logging.WARNING, logger="aiopg_resilient")
    async with await pg.start_standby(synchronous=True) as standby:
        async with pool_for(pg.dsn, app_name, max_size=2, heartbeat_timeout=0.3) as pool:
            await pool.fetchval("SELECT 1")
            await standby.stop("immediate")
            started = time.monotonic()
            with pytest.raises(CommitUnknown) as caught, anyio.fail_after(2.0):
                await pool.execute(f"INSERT INTO {table} VALUES ('a', 1)")
            assert 1.9 < time.monotonic() - started < 3.0
            xid = caught.value.xid
            assert xid is not None
            assert any(str(xid) in r.getMessage() for r in caplog.records)
            # The backend is still committing: not cancelled, not terminated.
            await anyio.sleep(1.0)
            assert await _scalar(pg, _SYNCREP, app_name) == 1
            assert await _count(pg, table) == 0  # not visible before it is replicated

            # Without a deadline the caller waits as long as the server works on it.
            done: list[int] = []

            async def write() -> None:
                done.append(await pool.execute(f"INSERT INTO {table} VALUES ('b', 1)"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                await until_value(lambda: _scalar(pg, _SYNCREP, app_name), 2, timeout=5)
                await anyio.sleep(1.0)  # > 3 x heartbeat_timeout
                assert done == []
                await standby.start()
            assert done == [1]
            assert pool.stats.connections_lost == 0  # the abandoned one was discarded
        await until_value(lambda: _scalar(pg, _SYNCREP, app_name), 0, timeout=10)
    assert await pg.execute(f"SELECT k, count(*) FROM {table} GROUP BY k ORDER BY k") == [
        ("a", 1),
        ("b", 1),
    ]
    log = pg.log_path.read_text() if pg.log_path is not None else ""
    assert "canceling wait for synchronous replication" not in log
    assert "canceling the wait for synchronous replication" not in log


async def test_resolution_in_a_saturated_pool(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """Guarantee 13: with every connection held and callers queueing (PoolTimeout for
    them), a lost COMMIT answer is still resolved: committed, exactly once."""
    assert tls_chaos_proxy.dsn is not None
    pool = pool_for(
        tls_chaos_proxy.dsn, app_name, max_size=2, heartbeat_timeout=0.5, acquire_timeout=0.3
    )
    async with pool:
        await pool.fetchval("SELECT 1")
        release = anyio.Event()
        timeouts: list[BaseException] = []

        async def hold() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
                await release.wait()

        async def queue() -> None:
            try:
                await pool.fetchval("SELECT 1")
            except (PoolTimeout, DatabaseUnavailable) as exc:
                timeouts.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await until(lambda: pool.stats.in_use == 1)
            tls_chaos_proxy.on_client_message(b"COMMIT", "cut_after")
            for _ in range(4):
                tg.start_soon(queue)
            with anyio.fail_after(10):
                n = await pool.execute(f"INSERT INTO {table} VALUES ('a', 1)")
            release.set()
        assert n == 1
        assert pool.stats.commits_resolved == 1
        assert pool.stats.commits_unknown == 0
    assert await _count(pg, table) == 1


async def test_outage_during_resolution_is_commit_unknown(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """Guarantee 13: the server goes away while a COMMIT is in doubt and stays away past
    the budget: CommitUnknown with the id, never DatabaseUnavailable (which would read
    as 'not applied')."""
    assert tls_chaos_proxy.dsn is not None
    policy = RetryPolicy(timeout=1.0)
    pool = pool_for(tls_chaos_proxy.dsn, app_name, max_size=2, heartbeat_timeout=0.3, retry=policy)
    async with pool:
        await pool.fetchval("SELECT 1")
        trigger = tls_chaos_proxy.on_client_message(b"COMMIT", "freeze_after")
        outcome: list[BaseException | int] = []

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_insert_a, pool, table, outcome)
                await trigger.wait()
                await pg.stop("immediate")
                with anyio.fail_after(10):
                    while not outcome:
                        await anyio.sleep(0.05)
        finally:
            tls_chaos_proxy.thaw()
            await pg.start()
        error = outcome[0]
        assert isinstance(error, CommitUnknown), error
        assert error.xid is not None
    assert await _count(pg, table) in (0, 1)  # whatever the crash kept: never twice


async def test_caller_cancelled_while_commit_is_out(
    pg: PostgresServer,
    tls_chaos_proxy: ChaosProxy,
    app_name: str,
    table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Guarantee 13: a caller whose deadline fires while its COMMIT is out (answer held
    on a silent path) gets CommitUnknown with the id and a WARNING naming it, never a
    plain timeout that reads as 'not applied'; the pool's counts stay exact."""
    caplog.set_level(logging.WARNING, logger="aiopg_resilient")
    assert tls_chaos_proxy.dsn is not None
    pool = pool_for(tls_chaos_proxy.dsn, app_name, max_size=2, heartbeat_timeout=5.0)
    async with pool:
        await pool.fetchval("SELECT 1")
        tls_chaos_proxy.on_client_message(b"COMMIT", "freeze_after")
        for entry in ("execute", "transaction"):
            with pytest.raises(CommitUnknown) as caught, anyio.fail_after(0.5):
                if entry == "execute":
                    await pool.execute(f"INSERT INTO {table} VALUES ('e', 1)")
                else:
                    async with pool.transaction() as conn:
                        await conn.execute(f"INSERT INTO {table} VALUES ('t', 1)")
            assert caught.value.xid is not None
            assert any(
                "cancelled" in r.getMessage() and str(caught.value.xid) in r.getMessage()
                for r in caplog.records
            )
            tls_chaos_proxy.on_client_message(b"COMMIT", "freeze_after")
        assert pool.stats.in_use == 0
        tls_chaos_proxy.thaw()
    # freeze_after: the server had committed both.
    assert await _count(pg, table) == 2
