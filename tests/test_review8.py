"""Review 8: holes in connecting, the FATAL hold, listen()/close(), re-entrancy, events."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import psycopg
import pytest

from aiopg_resilient import (
    PoolEvent,
    PoolTimeout,
    ResilientConnection,
    ResilientPool,
    RetryPolicy,
)
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import backends, pool_for, until_value

Conn = psycopg.AsyncConnection[Any]


async def test_rotated_password_does_not_fail_callers_that_a_live_connection_can_serve(
    pg: PostgresServer, app_name: str
) -> None:
    """A password rotated while the pool's sessions stay up (the normal case: existing
    sessions are not killed by ALTER ROLE). The pool cannot grow, but its live connection
    serves six short queries in ~0.3 s: none should fail with an auth error."""
    role = f"rv8_{app_name}"
    await pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'old'")
    password = "old"

    def conninfo() -> str:
        return pg.conninfo(user=role, password=password)

    try:
        async with ResilientPool(
            conninfo, name=app_name, min_size=1, max_size=3, acquire_timeout=5
        ) as pool:
            assert await pool.fetchval("SELECT current_user") == role
            await pg.execute(f"ALTER ROLE {role} PASSWORD 'new'")
            errors: list[BaseException] = []

            async def caller() -> None:
                try:
                    await pool.fetchval("SELECT pg_sleep(0.05)")
                except psycopg.OperationalError as exc:
                    errors.append(exc)

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    for _ in range(6):
                        tg.start_soon(caller)
            assert errors == [], [str(e) for e in errors]
    finally:
        await pg.terminate_backends(application_name=app_name)
        await pg.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.mark.slow
async def test_configure_stuck_on_a_half_open_connection_does_not_wedge_the_pool(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """The connection goes half-open right after login, while configure() runs its
    query: configure has no deadline, so the single-flight fill task hangs forever and
    the pool never connects again, although new connections work fine."""
    assert chaos_proxy.dsn is not None
    first = True

    async def configure(conn: Conn) -> None:
        nonlocal first
        if first:
            first = False
            chaos_proxy.freeze()  # only this session: new ones are forwarded
        await conn.execute("SELECT 1")

    pool = pool_for(
        chaos_proxy.dsn,
        app_name,
        min_size=0,
        max_size=2,
        acquire_timeout=1,
        heartbeat_timeout=1,
        retry=RetryPolicy(timeout=2),
        configure=configure,
    )
    try:
        async with pool:
            with anyio.fail_after(4), pytest.raises(psycopg.OperationalError):
                await pool.fetchval("SELECT 1")
            # The fault is gone for every new connection: the pool recovers once the
            # stuck setup times out (2 x heartbeat_timeout), not never.
            with anyio.fail_after(6):
                while True:
                    try:
                        assert await pool.fetchval("SELECT 1") == 1
                        break
                    except psycopg.OperationalError:
                        await anyio.sleep(0.1)
    finally:
        chaos_proxy.thaw()


@pytest.mark.slow
async def test_open_wait_timeout_bounds_the_first_connect(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """open(wait=True, timeout=1) against a black-holed server: PoolTimeout after ~1 s,
    not after connect_timeout (5 s) plus the timeout."""
    assert chaos_proxy.dsn is not None
    chaos_proxy.freeze_new(True)
    pool = pool_for(chaos_proxy.dsn, app_name, min_size=1, max_size=1)
    started = time.monotonic()
    try:
        with anyio.move_on_after(4):
            with pytest.raises(PoolTimeout):
                await pool.open(wait=True, timeout=1)
        assert time.monotonic() - started < 2.0, "open(wait=True, timeout=1) overran"
    finally:
        chaos_proxy.freeze_new(False)
        await pool.close()


async def test_close_during_the_listener_connect_ends_listen(
    pg: PostgresServer, app_name: str
) -> None:
    """close() while listen() is connecting its listener (a slow token fetch, a slow
    network): listen() must end and its connection must not outlive close()."""
    calls = 0

    async def conninfo() -> str:
        nonlocal calls
        calls += 1
        if calls >= 2:  # the first call is open()'s connection; then the listener's
            await anyio.sleep(0.5)
        return pg.dsn

    db = ResilientConnection(conninfo, name=app_name, heartbeat_interval=0.3)
    await db.open()
    ended = anyio.Event()

    async def consume() -> None:
        try:
            async for _ in db.listen(f"ch_{app_name}"):
                pass
        except Exception:
            pass
        finally:
            ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.2)  # the listener's connect is in flight
        await db.close()
        with anyio.move_on_after(3):
            await ended.wait()
        still_listening = not ended.is_set()
        leaked = await backends(pg, app_name)
        tg.cancel_scope.cancel()
    assert not still_listening, "listen() kept running after close()"
    assert leaked == 0, f"{leaked} backend(s) still open after close()"


async def test_conninfo_callable_returning_garbage_is_not_waited_on(
    pg: PostgresServer, app_name: str
) -> None:
    """A conninfo callable that returns None (a missing env var, a bug) is a
    configuration error the layer itself detects: callers should hear it at once, not
    wait the whole retry budget and then read 'database unreachable'."""
    pool = ResilientPool(
        lambda: None,  # type: ignore[arg-type,return-value]
        name=app_name,
        min_size=0,
        retry=RetryPolicy(timeout=1.5),
    )
    async with pool:
        started = time.monotonic()
        with anyio.fail_after(4), pytest.raises(psycopg.Error) as caught:
            await pool.fetchval("SELECT 1")
        waited = time.monotonic() - started
        assert isinstance(caught.value, psycopg.ProgrammingError), repr(caught.value)
        assert waited < 0.5, f"waited {waited:.2f}s"
        assert not pool.stats.down


async def test_min_size_open_raises_for_conninfo_callable_returning_garbage(
    pg: PostgresServer, app_name: str
) -> None:
    """Same, at open(): guarantee 4 says a configuration error raises at once."""
    pool = ResilientPool(lambda: 42, name=app_name, min_size=1)  # type: ignore[arg-type,return-value]
    try:
        with anyio.fail_after(3), pytest.raises(psycopg.ProgrammingError):
            await pool.open()
    finally:
        await pool.close()


async def test_task_spawned_inside_a_block_may_query_after_the_block(
    pg: PostgresServer, app_name: str
) -> None:
    """The re-entrancy guard is a ContextVar: a task started inside db.transaction()
    inherits it, so long after the block ended (the connection free) that task is still
    refused with 'already holds every connection'."""
    async with ResilientConnection(pg.dsn, name=app_name) as db:
        block_ended = anyio.Event()
        result: list[Any] = []

        async def worker() -> None:
            await block_ended.wait()
            result.append(await db.fetchval("SELECT 1"))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                async with db.transaction() as conn:
                    tg.start_soon(worker)
                    await conn.execute("SELECT 1")
                block_ended.set()
        assert result == [1]


async def test_async_on_event_tasks_do_not_outlive_close(pg: PostgresServer, app_name: str) -> None:
    """A slow async on_event: its tasks are the pool's, yet nothing cancels or awaits
    them at close(): they outlive the pool (and are destroyed pending at loop end)."""
    started = anyio.Event()

    async def on_event(event: PoolEvent) -> None:
        started.set()
        await anyio.sleep(30)

    async with pool_for(pg.dsn, app_name, on_event=on_event) as pool:
        assert await pool.fetchval("SELECT 1") == 1
        with anyio.fail_after(2):
            await started.wait()
    pending = [t for t in asyncio.all_tasks() if "_guarded" in repr(t.get_coro())]
    for task in pending:
        task.cancel()
    assert pending == [], f"{len(pending)} on_event task(s) still running after close()"


@pytest.mark.slow
async def test_listener_reconnect_failures_are_counted(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """One event stream: the listener's failed reconnects are connect attempts like the
    pool's, yet only its successes are counted (connects) and no connect_failed event is
    emitted for them."""
    assert chaos_proxy.dsn is not None
    events: list[PoolEvent] = []
    db = ResilientConnection(
        chaos_proxy.dsn, name=app_name, heartbeat_interval=None, on_event=events.append
    )
    got: list[object] = []
    async with db:

        async def consume() -> None:
            async for item in db.listen(f"ch_{app_name}"):
                got.append(item)
                return

        with anyio.fail_after(8):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await until_value(lambda: backends(pg, app_name), 2)  # pool's, listener's
                chaos_proxy.refuse()
                chaos_proxy.cut()
                await anyio.sleep(1.0)
                chaos_proxy.accept()
    failed = [e for e in events if e.kind == "connect_failed"]
    assert got
    assert type(got[0]).__name__ == "Reconnected"
    assert failed, "the listener's failed reconnects emitted no connect_failed event"
    assert db.stats.connect_failures == len(failed)


@pytest.mark.slow
async def test_too_many_connections_is_not_hammered_by_short_deadline_callers(
    pg: PostgresServer, app_name: str
) -> None:
    """53300 while growing (role connection limit reached): requests with a 0.1 s
    deadline arriving every 0.2 s. Each new fill task starts a fresh backoff with an
    immediate attempt, so the login rate follows the request rate instead of backing
    off: count the failed logins in 4 s (one backoff would allow ~8)."""
    role = f"rv8b_{app_name}"
    await pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' CONNECTION LIMIT 1")
    try:
        async with ResilientPool(
            pg.conninfo(user=role, password="pw"), name=app_name, min_size=1, max_size=4
        ) as pool:
            async with pool.connection():
                before = pool.stats.connect_failures
                t_end = time.monotonic() + 4.0
                while time.monotonic() < t_end:
                    with anyio.move_on_after(0.1):
                        await pool.fetchval("SELECT 1")
                    await anyio.sleep(0.1)
                logins = pool.stats.connect_failures - before
            print(f"\n53300: {logins} failed logins in 4 s")
            assert logins <= 12, f"{logins} failed logins in 4 s"
    finally:
        await pg.terminate_backends(application_name=app_name)
        await pg.execute(f"DROP ROLE IF EXISTS {role}")
