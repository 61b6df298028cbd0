"""Connecting that tells the truth (issue 8): configuration errors fail fast and are not
hammered, a crashed server is used again within the probe interval, connection attempts
are capped, psycopg_pool's open(wait=)/wait()/callable conninfo, and one event stream."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest

from aiopg_resilient import (
    ConfigureError,
    PoolClosed,
    PoolEvent,
    PoolTimeout,
    ResilientConnection,
    ResilientPool,
)
from aiopg_resilient.testing import PostgresServer

from .conftest import backends, pool_for, until, until_value

Conn = psycopg.AsyncConnection[Any]


async def test_failing_configure_fails_open_at_once(pg: PostgresServer, app_name: str) -> None:
    """Guarantee 4: configure() failing with a SQL error is a configuration error:
    open() raises ConfigureError at once (the SQL error as its cause), no retry loop."""

    async def configure(conn: Conn) -> None:
        await conn.execute("SET no_such_setting = 1")

    pool = pool_for(pg.dsn, app_name, configure=configure)
    started = time.monotonic()
    with pytest.raises(ConfigureError, match="configure\\(\\) failed") as caught:
        await pool.open()
    assert time.monotonic() - started < 1.0
    assert isinstance(caught.value.__cause__, psycopg.Error)
    assert pool.stats.connect_failures == 1
    await pool.close()


async def test_configure_left_in_a_transaction_fails_open(
    pg: PostgresServer, app_name: str
) -> None:
    """Guarantee 4: configure() that leaves a transaction open is a configuration error."""

    async def configure(conn: Conn) -> None:
        await conn.set_autocommit(False)
        await conn.execute("SELECT 1")

    with pytest.raises(ConfigureError, match="inside a transaction"):
        async with pool_for(pg.dsn, app_name, configure=configure):
            pass


async def test_configure_failing_later_reaches_callers_at_once(
    pg: PostgresServer, app_name: str
) -> None:
    """Guarantee 4: when configure() starts failing after open (a dropped function, a
    revoked grant), callers get the ConfigureError at once, not after the budget."""
    broken = False

    async def configure(conn: Conn) -> None:
        if broken:
            await conn.execute("SELECT no_such_function()")

    async with pool_for(pg.dsn, app_name, configure=configure, min_size=1, max_size=2) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        broken = True
        await pg.terminate_backends(application_name=app_name)
        started = time.monotonic()
        with pytest.raises(ConfigureError), anyio.fail_after(3):
            await pool.fetchval("SELECT 1")
        assert time.monotonic() - started < 1.5
        # Another caller during the hold hears it too, without a new login.
        failures = pool.stats.connect_failures
        with pytest.raises(ConfigureError):
            await pool.fetchval("SELECT 1")
        assert pool.stats.connect_failures == failures


@pytest.mark.slow
async def test_rotated_password_fails_fast_without_a_login_storm(
    pg: PostgresServer, app_name: str
) -> None:
    """Guarantee 4: a password changed under a running pool: callers hear "password
    authentication failed" at once, logins back off (at most 7 in 30 s, not hundreds:
    holds of 1, 2, 4, 8, 16 s, then 30 s), and the pool recovers by itself once the
    callable conninfo has the new password."""
    role = f"rot_{app_name}"
    await pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'old'")
    password = "old"

    def conninfo() -> str:
        return pg.conninfo(user=role, password=password)

    try:
        async with ResilientPool(conninfo, name=app_name, min_size=2, max_size=4) as pool:
            assert await pool.fetchval("SELECT current_user") == role
            await pg.execute(f"ALTER ROLE {role} PASSWORD 'new'")
            await pg.terminate_backends(application_name=app_name)
            errors: list[BaseException] = []
            t_end = time.monotonic() + 30.0
            before = pool.stats.connect_failures

            async def caller() -> None:
                while time.monotonic() < t_end:
                    started = time.monotonic()
                    try:
                        await pool.fetchval("SELECT 1")
                    except psycopg.OperationalError as exc:
                        assert time.monotonic() - started < 1.0, "a caller waited"
                        errors.append(exc)
                    await anyio.sleep(0.05)

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(caller)
            logins = pool.stats.connect_failures - before
            assert errors
            assert all("password authentication failed" in str(e) for e in errors)
            assert 1 <= logins <= 7, f"{logins} failed logins in 30 s"
            password = "new"
            fixed = time.monotonic()
            with anyio.fail_after(35):
                while True:
                    try:
                        assert await pool.fetchval("SELECT current_user") == role
                        break
                    except psycopg.OperationalError:
                        await anyio.sleep(0.2)
            print(
                f"\nrotated password: {len(errors)} caller errors (each at once), {logins} "
                f"failed logins in 30 s, recovered {time.monotonic() - fixed:.1f}s after "
                "the callable had the new password"
            )
    finally:
        await pg.terminate_backends(application_name=app_name)
        await pg.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.mark.slow
async def test_crashed_server_is_used_again_within_the_probe_interval(
    pg: PostgresServer, app_name: str
) -> None:
    """Guarantee 6: after `stop -m immediate` (57P03 while it recovers, then ready), the
    first query succeeds within 0.3 s of the server accepting connections, every time."""
    delays: list[float] = []
    async with pool_for(pg.dsn, app_name, min_size=2, max_size=2) as pool:
        for _ in range(5):
            assert await pool.fetchval("SELECT 1") == 1
            await pg.stop("immediate")
            outcome: list[float] = []

            async def reader(out: list[float] = outcome) -> None:
                assert await pool.fetchval("SELECT 1") == 1
                out.append(time.monotonic())

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.sleep(0.5)
                await pg.start()
                ready = time.monotonic()
            delays.append(outcome[0] - ready)
    print(f"\nrecovery after a crash: {[round(d, 3) for d in delays]}")
    assert max(delays) < 0.3, delays
    assert statistics.median(delays) < 0.2, delays


async def test_max_connecting_caps_attempts_in_flight(pg: PostgresServer, app_name: str) -> None:
    """Guarantee 6: filling min_size connections never has more than max_connecting
    attempts in flight (no thundering herd when a server comes back)."""
    async with pool_for(pg.dsn, app_name, min_size=6, max_size=6, max_connecting=2) as pool:
        peak = 0
        with anyio.fail_after(10):
            while pool.stats.size < 6:
                peak = max(peak, pool.stats.connecting)
                await anyio.lowlevel.checkpoint()
        assert 1 <= peak <= 2


async def test_open_wait_and_wait(pg: PostgresServer, app_name: str) -> None:
    """psycopg_pool parity: open(wait=True) returns once min_size connections are up;
    wait() on an open pool does the same; a server that never answers -> PoolTimeout."""
    pool = pool_for(pg.dsn, app_name, min_size=4, max_size=4)
    await pool.open(wait=True, timeout=10)
    assert pool.stats.size == 4
    await pool.wait(timeout=1)
    await pool.close()
    unreachable = pool_for("host=127.0.0.1 port=9 connect_timeout=1", app_name, min_size=1)
    with pytest.raises(PoolTimeout):
        await unreachable.open(wait=True, timeout=0.5)
    await unreachable.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_callable_conninfo(pg: PostgresServer, app_name: str, kind: str) -> None:
    """psycopg_pool parity: conninfo may be a sync or async callable, called for every
    new connection (rotating credentials, IAM tokens)."""
    calls = 0

    def sync_dsn() -> str:
        nonlocal calls
        calls += 1
        return pg.dsn

    async def async_dsn() -> str:
        return sync_dsn()

    source = sync_dsn if kind == "sync" else async_dsn
    async with ResilientPool(source, name=app_name, min_size=2, max_size=2) as pool:
        await pool.wait(timeout=5)
        assert await pool.fetchval("SELECT 1") == 1
    assert calls == 2


async def test_reentrant_query_on_a_resilient_connection_fails_at_once(
    pg: PostgresServer, app_name: str
) -> None:
    """A query on db inside db.transaction() cannot get a connection (db has one, the
    block holds it): a clear ProgrammingError at once, not a wait for the budget."""
    async with ResilientConnection(pg.dsn, name=app_name) as db:
        with anyio.fail_after(2):
            async with db.transaction() as conn:
                await conn.execute("SELECT 1")
                with pytest.raises(psycopg.ProgrammingError, match="already holds"):
                    await db.fetchval("SELECT 1")
        assert await db.fetchval("SELECT 2") == 2


async def test_a_query_in_a_child_task_of_the_block_fails_at_once(
    pg: PostgresServer, app_name: str
) -> None:
    """asyncio.wait_for (a task of its own before Python 3.12) and gather inside the
    block: the block still holds the one connection, so they hear it at once too."""
    async with ResilientConnection(pg.dsn, name=app_name) as db:
        with anyio.fail_after(2):
            async with db.transaction() as conn:
                await conn.execute("SELECT 1")
                with pytest.raises(psycopg.ProgrammingError, match="already holds"):
                    await asyncio.wait_for(db.fetchval("SELECT 1"), 5)
                with pytest.raises(psycopg.ProgrammingError, match="already holds"):
                    await asyncio.gather(db.fetchval("SELECT 1"))
        assert await db.fetchval("SELECT 2") == 2


async def test_a_task_holding_every_connection_of_a_pool_fails_at_once(
    pg: PostgresServer, app_name: str
) -> None:
    """The same rule for a pool: a task that holds all max_size connections in blocks
    and asks for one more would wait for itself; it hears so at once. One connection
    fewer held, and the query runs."""
    async with pool_for(pg.dsn, app_name, min_size=0, max_size=2) as pool:
        with anyio.fail_after(2):
            async with pool.connection() as first:
                await first.execute("SELECT 1")
                assert await pool.fetchval("SELECT 2") == 2
                async with pool.transaction() as second:
                    await second.execute("SELECT 1")
                    with pytest.raises(psycopg.ProgrammingError, match="already holds"):
                        await pool.fetchval("SELECT 3")
            assert await pool.fetchval("SELECT 4") == 4


@pytest.mark.parametrize("kind", ["connection", "pool"])
async def test_close_ends_a_running_listen(pg: PostgresServer, app_name: str, kind: str) -> None:
    """close() also stops a listen() iterating in another task, for a pool too; before
    that, the listener hears what is sent on its own connection (outside the pool)."""
    db: ResilientConnection | ResilientPool = (
        ResilientConnection(pg.dsn, name=app_name)
        if kind == "connection"
        else pool_for(pg.dsn, app_name, min_size=1, max_size=1)
    )
    await db.open()
    got: list[object] = []
    channel = f"ch_{app_name}"

    async def consume() -> None:
        async for item in db.listen(channel):
            got.append(item)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await until_value(lambda: backends(pg, app_name), 2)  # the pool's, the listener's
            # The pool's one connection is free for queries while the listener runs.
            with anyio.fail_after(2):
                while not got:
                    await db.execute("SELECT pg_notify(%s, 'hi')", (channel,))
                    await anyio.sleep(0.05)
            await db.close()
    assert all(isinstance(item, psycopg.Notify) and item.payload == "hi" for item in got)
    assert await backends(pg, app_name) == 0


async def test_one_event_stream(pg: PostgresServer, app_name: str) -> None:
    """One stream: every connect, loss and retry is a PoolEvent; PoolStats counts them;
    a failing or async on_event never breaks the pool."""
    events: list[PoolEvent] = []
    seen_async: list[str] = []

    def on_event(event: PoolEvent) -> None:
        events.append(event)
        if event.kind == "lost":
            raise RuntimeError("a buggy metrics hook")

    async with pool_for(pg.dsn, app_name, min_size=1, max_size=1, on_event=on_event) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        await pg.terminate_backends(application_name=app_name)
        await anyio.sleep(0.1)
        assert await pool.fetchval("SELECT 1") == 1
        stats = pool.stats
    kinds = [e.kind for e in events]
    assert kinds.count("connect") == stats.connects >= 2
    assert kinds.count("lost") == stats.connections_lost >= 1
    assert all(e.pool == app_name and e.at > 0 for e in events)
    connect = next(e for e in events if e.kind == "connect")
    assert connect.duration is not None
    assert connect.duration > 0
    lost = next(e for e in events if e.kind == "lost")
    assert lost.error is not None
    assert pg.password not in repr(events)

    async def on_event_async(event: PoolEvent) -> None:
        await anyio.lowlevel.checkpoint()
        seen_async.append(event.kind)

    async with pool_for(pg.dsn, app_name, on_event=on_event_async) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        await until(lambda: "connect" in seen_async)


async def test_close_is_clean_under_cancellation(pg: PostgresServer, app_name: str) -> None:
    """close() cancelled by its caller propagates the cancellation, still closes every
    idle connection and fails every waiter with its own PoolClosed; nothing goes back
    into the closed pool afterwards."""
    pool = pool_for(pg.dsn, app_name, min_size=2, max_size=2, acquire_timeout=5)
    await pool.open(wait=True, timeout=5)
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await pool.fetchval("SELECT 1")
        except PoolClosed as exc:
            errors.append(exc)

    held, done = anyio.Event(), anyio.Event()

    async def holder() -> None:
        async with pool.connection(), pool.connection():
            held.set()
            await done.wait()

    # Both connections busy (held by another task), three callers waiting.
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await held.wait()
        for _ in range(3):
            tg.start_soon(waiter)
        await until(lambda: pool.stats.waiting == 3)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pool.close()
        assert scope.cancelled_caught
        done.set()
    assert len(errors) == 3
    assert len({id(e) for e in errors}) == 3
    await until(lambda: pool.stats.size == 0)
    assert pool.stats.idle == 0
    await until_value(lambda: backends(pg, app_name), 0, timeout=5)
