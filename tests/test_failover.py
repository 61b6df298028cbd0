"""Failover that knows the server's role (issue 9.1), against real role changes: a
multi-host conninfo over a primary and its streaming standby, a promotion after the
primary is stopped, a switchover where the old primary stays up as a standby, in-doubt
resolution across a promotion, a read pool on standbys.

The servers here are private to each test (a switchover demotes its primary).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import pytest
import pytest_asyncio

from aiopg_resilient import CommitUnknown, ResilientPool, RetryPolicy
from aiopg_resilient.testing import ChaosProxy, PostgresServer, StandbyServer
from aiopg_resilient.testing._backends import ENV_DSN
from aiopg_resilient.testing._switchover import switchover

pytestmark = pytest.mark.skipif(bool(os.environ.get(ENV_DSN)), reason="needs server control")


@dataclass
class Pair:
    primary: PostgresServer
    standby: StandbyServer

    def dsn(self, **extra: str) -> str:
        ports = f"{self.primary.port},{self.standby.port}"
        return self.primary.conninfo(host="127.0.0.1,127.0.0.1", port=ports, **extra)


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[Pair]:
    """A primary and a synchronous standby of its own (acknowledged writes are on both)."""
    async with PostgresServer() as primary:
        standby = await primary.start_standby(synchronous=True)
        async with standby:
            await primary.execute("CREATE TABLE ledger (k text PRIMARY KEY)")
            await standby.catch_up()
            yield Pair(primary, standby)


@dataclass
class Load:
    reads: int = 0
    read_errors: list[str] = field(default_factory=list)
    outcome: dict[str, str] = field(default_factory=dict)
    slowest_read: float = 0.0


async def _reader(pool: ResilientPool, load: Load, t_end: float, n: int) -> None:
    i = 0
    while time.monotonic() < t_end:
        i += 1
        started = time.monotonic()
        try:
            assert await pool.fetchval("SELECT %s::int", (n * 100000 + i,)) == n * 100000 + i
            load.reads += 1
        except Exception as exc:
            load.read_errors.append(f"{type(exc).__name__}: {exc}")
        load.slowest_read = max(load.slowest_read, time.monotonic() - started)
        await anyio.sleep(0.01)


async def _writer(pool: ResilientPool, load: Load, t_end: float, n: int) -> None:
    i = 0
    while time.monotonic() < t_end:
        i += 1
        key = f"w{n}-{i}"
        try:
            await pool.execute("INSERT INTO ledger VALUES (%s)", (key,))
            load.outcome[key] = "ok"
        except CommitUnknown:
            load.outcome[key] = "unknown"
        except Exception as exc:
            load.outcome[key] = f"error: {type(exc).__name__}: {exc}"
        await anyio.sleep(0.02)


async def _check(server: PostgresServer, load: Load) -> dict[str, list[str]]:
    rows = {k for (k,) in await server.execute("SELECT k FROM ledger")}
    return {
        "lost": [k for k, o in load.outcome.items() if o == "ok" and k not in rows],
        "phantom": [k for k, o in load.outcome.items() if o.startswith("error") and k in rows],
        "errors": [o for o in load.outcome.values() if o.startswith("error")],
        "unknown": [k for k, o in load.outcome.items() if o == "unknown"],
    }


def _pool(dsn: str, name: str) -> ResilientPool:
    return ResilientPool(
        dsn,
        name=name,
        min_size=4,
        max_size=8,
        heartbeat_interval=1.0,
        heartbeat_timeout=1.0,
        retry=RetryPolicy(timeout=20),
    )


async def test_primary_stopped_standby_promoted(pair: Pair) -> None:
    """The primary crashes (stop -m immediate), the synchronous standby is promoted: reads
    see no error, writes resume on the new primary; nothing acknowledged is lost."""
    load = Load()
    async with _pool(pair.dsn(target_session_attrs="read-write"), "failover") as pool:
        t_end = time.monotonic() + 5.0
        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(_reader, pool, load, t_end, n)
            for n in range(2):
                tg.start_soon(_writer, pool, load, t_end, n)
            await anyio.sleep(1.0)
            await pair.primary.stop("immediate")
            await anyio.sleep(0.3)
            await pair.standby.promote()
        stats = pool.stats
    result = await _check(pair.standby, load)
    print(f"\nfailover: {load.reads} reads, {len(load.outcome)} writes, {result}, {stats}")
    assert load.read_errors == []
    assert result["lost"] == []
    assert result["phantom"] == []
    assert result["errors"] == []
    assert sum(1 for o in load.outcome.values() if o == "ok") > 20  # writes resumed


@pytest.mark.slow
async def test_chaos_across_switchovers(pair: Pair) -> None:
    """30 s of reads and writes while the roles switch over and back every 5 s (the old
    primary stays up, a standby of the new one): zero read errors, zero doubled, lost or
    phantom writes; a COMMIT cut by the switch is resolved or CommitUnknown."""
    load = Load()
    switches = 0
    async with _pool(pair.dsn(target_session_attrs="read-write"), "switch") as pool:
        t_end = time.monotonic() + 30.0
        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(_reader, pool, load, t_end, n)
            for n in range(3):
                tg.start_soon(_writer, pool, load, t_end, n)
            servers: list[PostgresServer] = [pair.primary, pair.standby]
            while time.monotonic() < t_end - 6:
                await anyio.sleep(5.0)
                await switchover(servers[0], servers[1])
                servers.reverse()
                switches += 1
        stats = pool.stats
    primary = servers[0]
    result = await _check(primary, load)
    print(
        f"\nswitchovers: {switches}, {load.reads} reads (slowest {load.slowest_read:.2f}s), "
        f"{len(load.outcome)} writes, unknown {len(result['unknown'])}, lost "
        f"{result['lost']}, phantom {result['phantom']}, errors {result['errors'][:3]}, "
        f"retries {stats.retries}, lost connections {stats.connections_lost}, "
        f"resolved {stats.commits_resolved}"
    )
    assert switches >= 4
    assert load.read_errors == []
    assert result["lost"] == []
    assert result["phantom"] == []
    assert result["errors"] == []
    # A PRIMARY KEY makes a doubled write an error, so doubles would show up above.


async def test_in_doubt_across_a_promotion_is_commit_unknown(pair: Pair) -> None:
    """COMMIT runs on the primary, its answer is held (freeze_after), and the roles switch
    before the layer can look: the server that answers is another timeline, so the only
    honest answer is CommitUnknown with the id, never a guess (the row is there)."""
    proxy = ChaosProxy.for_server(pair.primary, tls=True)
    with proxy:
        assert proxy.dsn is not None
        ports = f"{proxy.port},{pair.standby.port}"
        dsn = pair.primary.conninfo(
            host="127.0.0.1,127.0.0.1", port=ports, target_session_attrs="read-write"
        )
        async with _pool(dsn, "indoubt_failover") as pool:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
            trigger = proxy.on_client_message(b"COMMIT", "freeze_after")
            result: list[BaseException] = []

            async def write() -> None:
                try:
                    await pool.execute("INSERT INTO ledger VALUES ('doubt')")
                except BaseException as exc:
                    result.append(exc)

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(write)
                    await trigger.wait(5)
                    await switchover(pair.primary, pair.standby)
    assert len(result) == 1, result
    assert isinstance(result[0], CommitUnknown), result
    assert result[0].xid is not None
    rows = await pair.standby.execute("SELECT count(*) FROM ledger WHERE k = 'doubt'")
    assert rows[0][0] == 1


async def test_a_write_on_a_standby_moves_to_the_primary(pair: Pair) -> None:
    """No target_session_attrs and the standby listed first: the pool's connections land
    on the standby (reads work there). The first write gets 25006 from a server in
    recovery: the pool drops every connection to standbys, asks libpq for a read-write
    session from then on, and the write succeeds on the primary: no error at all."""
    ports = f"{pair.standby.port},{pair.primary.port}"
    dsn = pair.primary.conninfo(host="127.0.0.1,127.0.0.1", port=ports)
    async with _pool(dsn, "wrong_role") as pool:
        await pool.wait(timeout=5)
        assert await pool.fetchval("SELECT pg_is_in_recovery()") is True
        assert await pool.execute("INSERT INTO ledger VALUES ('moved')") == 1
        assert await pool.fetchval("SELECT pg_is_in_recovery()") is False
        stats = pool.stats
    assert stats.connections_lost >= 4  # the idle standby connections went at once
    rows = await pair.primary.execute("SELECT count(*) FROM ledger WHERE k = 'moved'")
    assert rows[0][0] == 1


async def test_read_pool_on_standbys_falls_back_to_the_primary(pair: Pair) -> None:
    """A read pool with target_session_attrs=prefer-standby reads from the standby; when
    no standby answers, it reads from the primary without an error. (The standby is
    listed first: psycopg < 3.3 tries the hosts one by one itself, so libpq's
    prefer-standby only sees one host at a time.)"""
    ports = f"{pair.standby.port},{pair.primary.port}"
    dsn = pair.primary.conninfo(
        host="127.0.0.1,127.0.0.1", port=ports, target_session_attrs="prefer-standby"
    )
    async with ResilientPool(dsn, name="reads", min_size=2, max_size=4) as reads:
        assert await reads.fetchval("SELECT pg_is_in_recovery()") is True
        await pair.standby.set_synchronous(False)  # the primary must not wait for it
        await pair.standby.stop("fast")
        with anyio.fail_after(10):
            for _ in range(20):
                assert await reads.fetchval("SELECT 1") == 1
        assert await reads.fetchval("SELECT pg_is_in_recovery()") is False
        await pair.standby.start()
        # Connections made while no standby answered stay on the primary until they are
        # recycled (max_lifetime); reads keep working meanwhile.
        assert await reads.fetchval("SELECT 1") == 1
    async with ResilientPool(dsn, name="reads2", min_size=1, max_size=1) as again:
        with anyio.fail_after(10):
            while await again.fetchval("SELECT pg_is_in_recovery()") is not True:
                await anyio.sleep(0.1)
