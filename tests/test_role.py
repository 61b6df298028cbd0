"""The server's role as connections see it (issue 9.1): a primary fenced read-only by its
HA tooling is never "fixed" by the pool, connections on it are dropped, and a write goes
where a read-write session is."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import psycopg
import psycopg.errors
import pytest

from aiopg_resilient import ResilientPool
from aiopg_resilient._role import drifted, prefer_primary
from aiopg_resilient.testing import PostgresServer


def test_drift_is_towards_read_only_only() -> None:
    assert drifted((b"off", b"off"), (b"on", b"off")) is not None
    assert drifted((None, b"off"), (b"on", b"off")) is not None
    assert drifted((b"off", b"off"), (b"off", b"on")) is not None
    assert drifted((b"on", b"off"), (b"off", b"off")) is None  # promoted: fine
    assert drifted((b"off", b"on"), (b"off", b"off")) is None  # fence lifted: fine
    assert drifted((b"off", b"off"), (b"off", b"off")) is None


def test_prefer_primary_only_for_several_hosts_without_a_choice() -> None:
    assert "read-write" in prefer_primary("host=a,b port=1,2 dbname=x")
    assert prefer_primary("host=a port=1") == "host=a port=1"
    assert "read-write" in prefer_primary("host=a,b target_session_attrs=any")
    kept = prefer_primary("host=a,b target_session_attrs=prefer-standby")
    assert "read-write" not in kept


@pytest.fixture
async def fenced() -> AsyncIterator[PostgresServer]:
    """A server of its own: the test fences it with ALTER SYSTEM."""
    async with PostgresServer() as server:
        yield server


async def _fence(server: PostgresServer, on: bool) -> None:
    value = "on" if on else "off"
    await server.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
    await server.execute("SELECT pg_reload_conf()")


async def test_a_fence_is_not_undone_by_the_pool(fenced: PostgresServer) -> None:
    """The server turns read-only while the pool's connections are idle and in use: the
    pool drops them (no SET back to off), so a write fails with 25006 honestly instead
    of landing on a fenced primary; once the fence is lifted, writes work again."""
    await fenced.execute("CREATE TABLE fence_t (k int)")
    async with ResilientPool(fenced.dsn, name="fence", min_size=3, max_size=3) as pool:
        await pool.wait(timeout=5)
        assert await pool.execute("INSERT INTO fence_t VALUES (1)") == 1
        async with pool.connection() as busy:
            await _fence(fenced, True)
            with anyio.fail_after(3):
                while busy.info.parameter_status("default_transaction_read_only") != "on":
                    await busy.execute("SELECT 1")
        lost_before = pool.stats.connections_lost
        for _ in range(5):
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                await pool.execute("INSERT INTO fence_t VALUES (2)")
        assert pool.stats.connections_lost >= lost_before + 2  # the idle ones were dropped
        await _fence(fenced, False)
        with anyio.fail_after(5):
            while True:
                try:
                    assert await pool.execute("INSERT INTO fence_t VALUES (3)") == 1
                    break
                except psycopg.errors.ReadOnlySqlTransaction:
                    await anyio.sleep(0.05)
    rows = await fenced.execute("SELECT k FROM fence_t ORDER BY k")
    assert [r[0] for r in rows] == [1, 3]


async def test_a_lifted_fence_is_not_put_back_by_the_pool(fenced: PostgresServer) -> None:
    """Connections made while the server was read-only (their configured default is
    "on") see it lifted by a reload while idle: the pool must not SET it back to "on"
    when they come back; writes work on every one of them."""
    await fenced.execute("CREATE TABLE lift_t (k int)")
    await _fence(fenced, True)
    async with ResilientPool(fenced.dsn, name="lift", min_size=3, max_size=3) as pool:
        await pool.wait(timeout=5)
        await _fence(fenced, False)
        await anyio.sleep(0.2)  # the idle sessions take the reload
        for n in range(10):
            async with anyio.create_task_group() as tg:
                for k in range(3):
                    tg.start_soon(pool.execute, "INSERT INTO lift_t VALUES (%s)", (n * 3 + k,))
    rows = await fenced.execute("SELECT count(*) FROM lift_t")
    assert rows[0][0] == 30
