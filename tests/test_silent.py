"""Silent peers mid-query (issue 9.3): a statement in flight whose path goes silent (the
proxy holds the bytes, the sockets stay open) is answered from a fresh connection within
about heartbeat_timeout; a slow but healthy query is neither cut nor run twice; a write
stuck before COMMIT has its ghost terminated before it is re-run."""

from __future__ import annotations

import time
from collections.abc import Awaitable

import anyio

from aiopg_resilient._look import CANNOT
from aiopg_resilient._watch import silent
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import pool_for

PATIENCE = 1.0  # heartbeat_timeout in these tests


async def test_reads_and_writes_in_flight_on_a_frozen_path_are_answered_elsewhere(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """16 reads and 4 writes in flight, and 4 writes idle in the pool, when every open
    session freezes: none errors, none reaches a 10 s deadline; each is answered from a
    fresh connection within about 2 x patience; every write is applied exactly once."""
    assert tls_chaos_proxy.dsn is not None
    durations: dict[str, float] = {}
    deadline_hits: list[str] = []
    async with pool_for(
        tls_chaos_proxy.dsn, app_name, min_size=24, max_size=24, heartbeat_timeout=PATIENCE
    ) as pool:
        await pool.wait(timeout=10)

        async def timed(name: str, op: Awaitable[object]) -> None:
            started = time.monotonic()
            with anyio.move_on_after(10) as scope:
                await op
            if scope.cancelled_caught:
                deadline_hits.append(name)
            durations[name] = time.monotonic() - started

        async def read(n: int) -> None:
            assert await pool.fetchval("SELECT %s::int FROM pg_sleep(0.3)", (n,)) == n

        async def write(n: int, sleep: float) -> None:
            query = f"INSERT INTO {table} SELECT %s, 1 FROM pg_sleep(%s)"
            assert await pool.execute(query, (f"w{n}", sleep)) == 1

        async with anyio.create_task_group() as tg:
            for n in range(16):
                tg.start_soon(timed, f"r{n}", read(n))
            for n in range(4):
                tg.start_soon(timed, f"w{n}", write(n, 0.3))
            await anyio.sleep(0.1)  # all in flight
            frozen = tls_chaos_proxy.freeze()
            for n in range(4, 8):  # on connections frozen while idle
                tg.start_soon(timed, f"w{n}", write(n, 0.0))
        stats = pool.stats
    tls_chaos_proxy.thaw()
    rows = await pg.execute(f"SELECT k, count(*) FROM {table} GROUP BY k")
    counts = {k: int(c) for k, c in rows}
    print(
        f"\nfreeze: {frozen} sessions frozen, 16 reads and 8 writes, {len(deadline_hits)} "
        f"reached the deadline, slowest {max(durations.values()):.2f}s, lost "
        f"{stats.connections_lost}, retries {stats.retries}, resolved {stats.commits_resolved}"
    )
    assert frozen >= 20
    assert deadline_hits == []
    assert len(durations) == 24
    assert max(durations.values()) < 2 * PATIENCE + 2.0
    assert counts == {f"w{n}": 1 for n in range(8)}


async def test_slow_healthy_query_is_neither_cut_nor_rerun(
    tls_chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """pg_sleep(3) with patience 0.5 s: the backend is seen working, so the query runs
    once and returns; nothing is lost or retried."""
    assert tls_chaos_proxy.dsn is not None
    async with pool_for(
        tls_chaos_proxy.dsn, app_name, min_size=1, max_size=2, heartbeat_timeout=0.5
    ) as pool:
        started = time.monotonic()
        assert await pool.fetchval("SELECT 7 FROM pg_sleep(3)") == 7
        elapsed = time.monotonic() - started
        stats = pool.stats
    assert 3.0 <= elapsed < 4.0
    assert stats.retries == 0
    assert stats.connections_lost == 0


async def test_write_stuck_before_commit_on_a_silent_path_ends_its_ghost_first(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """The INSERT runs, its answer is held (freeze_after): the backend is idle in
    transaction holding the key's lock. The layer terminates it, waits for it to exit,
    then re-runs the write: exactly one row, no wait on its own ghost."""
    assert tls_chaos_proxy.dsn is not None
    name = f"ghost_{app_name}"
    await pg.execute(f"CREATE TABLE {name} (k int PRIMARY KEY)")
    try:
        async with pool_for(
            tls_chaos_proxy.dsn, app_name, min_size=1, max_size=2, heartbeat_timeout=PATIENCE
        ) as pool:
            tls_chaos_proxy.on_client_message(f"INSERT INTO {name}".encode(), "freeze_after")
            started = time.monotonic()
            with anyio.fail_after(10):
                assert await pool.execute(f"INSERT INTO {name} VALUES (1)") == 1
            elapsed = time.monotonic() - started
            stats = pool.stats
        rows = await pg.execute(f"SELECT count(*) FROM {name}")
        ghosts = await pg.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%' "
            "AND application_name = %s",
            (app_name,),
        )
    finally:
        tls_chaos_proxy.thaw()
        await pg.execute(f"DROP TABLE IF EXISTS {name}")
    assert rows[0][0] == 1
    assert ghosts[0][0] == 0
    assert elapsed < 2 * PATIENCE + 1.5
    assert stats.connections_lost >= 1


async def test_big_result_read_slowly_is_not_cut(
    tls_chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """A big report through a slow path: the backend spends seconds blocked sending
    (ClientWrite) while the client receives steadily. Data keeps arriving on the
    client's socket, so the layer keeps waiting: one run, the whole result."""
    assert tls_chaos_proxy.dsn is not None
    async with pool_for(
        tls_chaos_proxy.dsn, app_name, min_size=1, max_size=2, heartbeat_timeout=0.5
    ) as pool:
        await pool.wait(timeout=5)
        tls_chaos_proxy.set_latency(0.004)  # every chunk late: a slow path
        try:
            started = time.monotonic()
            rows = await pool.fetch("SELECT repeat('x', 2000) FROM generate_series(1, 1500)")
            elapsed = time.monotonic() - started
        finally:
            tls_chaos_proxy.set_latency(0)
        stats = pool.stats
    print(f"\nbig result: {len(rows)} rows in {elapsed:.2f}s, lost {stats.connections_lost}")
    assert len(rows) == 1500
    assert elapsed > 1.0  # slow enough for the layer to look at it
    assert stats.retries == 0
    assert stats.connections_lost == 0


def test_the_silent_decision() -> None:
    """Pure: when a statement with no answer for a while is on a silent path. Rows are
    (state, wait_event, seconds in that state); the statement has been out 2 s."""
    p = 1.0

    def is_silent(row: object, quiet: float | None, big: bool = False) -> bool:
        return silent(row, quiet, p, running=2.0, big=big)

    assert is_silent(None, None)  # the backend is gone
    assert is_silent(None, 3.0)
    assert not is_silent(None, 0.1)  # ... but data still moves on our socket: wait
    assert not is_silent(CANNOT, 9.0)  # another server, or the look failed
    assert is_silent(("idle", "ClientRead", 1.0), None)  # done: the answer never came
    assert is_silent(("idle in transaction", "ClientRead", 1.0), 5.0)
    assert not is_silent(("idle", "ClientRead", 1.0), 0.2)  # data still moving
    assert not is_silent(("active", None, 2.0), 9.0)  # working on it
    assert not is_silent(("active", "transactionid", 2.0), 9.0)  # waiting on a lock
    assert not is_silent(("disabled", None, None), 9.0)  # track_activities = off
    assert not is_silent((None, None, None), 9.0)  # hidden from this role: cannot tell
    assert not is_silent(("active", "ClientWrite", 2.0), None)  # cannot tell: working
    assert not is_silent(("active", "ClientWrite", 2.0), 0.1)  # a big result, flowing
    assert is_silent(("active", "ClientWrite", 2.0), 3.0)  # blocked, nothing arrives
    assert is_silent(("active", "ClientRead", 2.0), 3.0)  # frozen between Parse and Bind
    # A big request that has not arrived (idle since before it was sent, or being read)
    # may still be crossing a buffering middlebox: not proof. Once it ran, it is.
    assert not is_silent(("idle", "ClientRead", 5.0), 3.0, big=True)
    assert not is_silent(("active", "ClientRead", 1.0), 3.0, big=True)
    assert is_silent(("idle", "ClientRead", 1.0), 3.0, big=True)
    assert is_silent(("idle", "ClientRead", 5.0), 3.0)  # small and never arrived: frozen
