"""A skeptical review of issue 8 (the login generator, listen(), re-entrancy): each test
staged a way to hang, leak or mislabel; they stay as regression tests."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import anyio
import psycopg
import psycopg.errors
import pytest

from aiopg_resilient import (
    Failure,
    ResilientConnection,
    RetryPolicy,
    classify,
)
from aiopg_resilient._driver import DriverConnection
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import backends, pool_for, until, until_value

Conn = psycopg.AsyncConnection[Any]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- 1. the login generator ------------------------------------------------------------


async def test_statement_errors_after_login_are_not_verbose(
    pg: PostgresServer, app_name: str
) -> None:
    """The verbosity is raised for the handshake only: later errors keep libpq's
    default form (no 'LOCATION:' line, no SQLSTATE in the text)."""
    with anyio.fail_after(10):
        async with pool_for(pg.dsn, app_name, min_size=1, max_size=1) as pool:
            with pytest.raises(psycopg.errors.UndefinedTable) as caught:
                await pool.fetch("SELECT * FROM no_such_table_x")
            text = str(caught.value)
            assert "LOCATION" not in text, text
            assert "42P01" not in text, text
            with pytest.raises(psycopg.errors.DivisionByZero) as caught2:
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1/0")
            assert "LOCATION" not in str(caught2.value), str(caught2.value)
            # a notice after login: default form too
            notes: list[str] = []
            async with pool.connection() as conn:
                conn.add_notice_handler(lambda d: notes.append(str(d.message_primary)))
                await conn.execute("DO $$BEGIN RAISE NOTICE 'hello'; END$$")
            assert notes == ["hello"]


async def test_multi_host_first_refused_second_ok(pg: PostgresServer, app_name: str) -> None:
    dead = _free_port()
    dsn = pg.conninfo(host="127.0.0.1,127.0.0.1", port=f"{dead},{pg.port}")
    with anyio.fail_after(10):
        async with pool_for(dsn, app_name, min_size=1, max_size=1) as pool:
            assert await pool.fetchval("SELECT 1") == 1


async def test_multi_host_target_session_attrs(pg: PostgresServer, app_name: str) -> None:
    dead = _free_port()
    dsn = pg.conninfo(
        host="127.0.0.1,127.0.0.1",
        port=f"{dead},{pg.port}",
        target_session_attrs="read-write",
    )
    with anyio.fail_after(10):
        async with pool_for(dsn, app_name, min_size=1, max_size=1) as pool:
            assert await pool.fetchval("SELECT 1") == 1
    # read-only wanted, only a primary there: a WRONG_ROLE error with libpq's text
    dsn = pg.conninfo(target_session_attrs="standby")
    with anyio.fail_after(10), pytest.raises(psycopg.OperationalError) as caught:
        await DriverConnection.connect(dsn)
    assert classify(caught.value) is Failure.WRONG_ROLE, str(caught.value)
    assert "LOCATION" not in str(caught.value)


@pytest.mark.parametrize("sslmode", ["prefer", "allow", "require"])
async def test_sslmodes_connect(pg: PostgresServer, sslmode: str) -> None:
    with anyio.fail_after(10):
        conn = await DriverConnection.connect(pg.conninfo(sslmode=sslmode, gssencmode="prefer"))
        try:
            with pytest.raises(psycopg.errors.UndefinedTable) as caught:
                await conn.execute("SELECT * FROM nope_nope")
            assert "LOCATION" not in str(caught.value)
        finally:
            await conn.close()


async def test_connect_timeout_on_a_black_hole(chaos_proxy: ChaosProxy) -> None:
    """connect_timeout=1 through a proxy that answers nothing: ConnectionTimeout, ~1 s."""
    assert chaos_proxy.dsn is not None
    chaos_proxy.freeze_new(True)
    try:
        started = time.monotonic()
        with anyio.fail_after(6), pytest.raises(psycopg.OperationalError) as caught:
            await DriverConnection.connect(chaos_proxy.dsn + " connect_timeout=1")
        took = time.monotonic() - started
        assert took < 2.5, took
        assert isinstance(caught.value, psycopg.errors.ConnectionTimeout), repr(caught.value)
    finally:
        chaos_proxy.freeze_new(False)


async def test_wrong_password_is_typed(pg: PostgresServer) -> None:
    with anyio.fail_after(5), pytest.raises(psycopg.errors.InvalidPassword) as caught:
        await DriverConnection.connect(pg.conninfo(password="wrong"))
    text = str(caught.value)
    assert "28P01" not in text, text
    assert "LOCATION" not in text, text


# -- login errors whose SQLSTATE is not in the table -----------------------------------


async def _role_and_db(pg: PostgresServer, app_name: str) -> tuple[str, str]:
    role, db = f"r_{app_name}", f"d_{app_name}"
    await pg.execute(f"DROP DATABASE IF EXISTS {db}")
    await pg.execute(f"DROP ROLE IF EXISTS {role}")
    await pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    await pg.execute(f"CREATE DATABASE {db}")
    return role, db


async def test_revoked_connect_privilege_fails_open_at_once(
    pg: PostgresServer, app_name: str
) -> None:
    """REVOKE CONNECT: 'FATAL: permission denied for database' (42501) is a configuration
    error (guarantee 4). The new SQLSTATE typing makes it an InsufficientPrivilege (a
    ProgrammingError) that classify() calls STATEMENT ('the connection is fine'), and
    open() keeps retrying in the background instead of raising."""
    role, db = await _role_and_db(pg, app_name)
    await pg.execute(f"REVOKE CONNECT ON DATABASE {db} FROM PUBLIC")
    dsn = pg.conninfo(user=role, password="pw", dbname=db)
    with pytest.raises(psycopg.OperationalError) as raw:
        await DriverConnection.connect(dsn)
    print("error:", type(raw.value).__mro__, raw.value.sqlstate, classify(raw.value))
    pool = pool_for(dsn, app_name, min_size=1, max_size=1, retry=RetryPolicy(timeout=3))
    try:
        started = time.monotonic()
        with anyio.fail_after(8):
            with pytest.raises(psycopg.OperationalError) as caught:
                await pool.open()
                await pool.fetchval("SELECT 1")
        took = time.monotonic() - started
        print("took", took, type(caught.value), pool.stats.connect_failures)
        assert classify(raw.value) is Failure.FATAL, classify(raw.value)
        assert took < 1.0, f"a configuration error retried for {took:.1f}s"
    finally:
        await pool.close()
        await pg.execute(f"DROP DATABASE IF EXISTS {db}")
        await pg.execute(f"DROP ROLE IF EXISTS {role}")


async def test_database_not_accepting_connections(pg: PostgresServer, app_name: str) -> None:
    """ALTER DATABASE ... ALLOW_CONNECTIONS false: 55000, a configuration error too."""
    role, db = await _role_and_db(pg, app_name)
    await pg.execute(f"ALTER DATABASE {db} ALLOW_CONNECTIONS false")
    dsn = pg.conninfo(dbname=db)
    try:
        with anyio.fail_after(5), pytest.raises(psycopg.OperationalError) as raw:
            await DriverConnection.connect(dsn)
        print("error:", repr(raw.value), raw.value.sqlstate, classify(raw.value))
        assert classify(raw.value) is not Failure.STATEMENT
    finally:
        await pg.execute(f"ALTER DATABASE {db} ALLOW_CONNECTIONS true")
        await pg.execute(f"DROP DATABASE IF EXISTS {db}")
        await pg.execute(f"DROP ROLE IF EXISTS {role}")


async def test_a_name_in_the_message_is_not_read_as_the_sqlstate(pg: PostgresServer) -> None:
    """'database "x: y:  57P03: z" does not exist' is 3D000 (FATAL), not 57P03 (busy)."""
    with anyio.fail_after(5), pytest.raises(psycopg.OperationalError) as caught:
        await DriverConnection.connect(pg.conninfo(dbname="x: y:  57P03: z"))
    print(repr(caught.value), caught.value.sqlstate)
    assert caught.value.sqlstate == "3D000"
    assert classify(caught.value) is Failure.FATAL


async def test_close_during_the_listener_backoff_ends_it_promptly_and_cleanly(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """The server is unreachable; the listener sleeps between reconnects. close() must
    end listen() (return, as close() does in every other state) at once, not raise
    PoolClosed after the backoff sleep."""
    assert chaos_proxy.dsn is not None
    pool = pool_for(
        chaos_proxy.dsn,
        app_name,
        min_size=1,
        max_size=1,
        heartbeat_interval=0.2,
        heartbeat_timeout=0.5,
        retry=RetryPolicy(initial=3.0, max_delay=3.0, jitter="none", timeout=60),
    )
    await pool.open()
    outcome: list[object] = []
    ended = anyio.Event()

    async def consume() -> None:
        try:
            async for item in pool.listen(f"ch_{app_name}"):
                outcome.append(item)
            outcome.append("returned")
        except Exception as exc:
            outcome.append(exc)
        finally:
            ended.set()

    try:
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await until(lambda: chaos_proxy.stats.open >= 2)
                await anyio.sleep(0.2)
                await anyio.to_thread.run_sync(chaos_proxy.refuse)
                await anyio.to_thread.run_sync(chaos_proxy.cut)
                await anyio.sleep(0.5)  # lost, one refused connect, now sleeping 3 s
                started = time.monotonic()
                await pool.close()
                await ended.wait()
                took = time.monotonic() - started
    finally:
        chaos_proxy.accept()
    print(outcome, f"{took:.2f}s")
    assert outcome == ["returned"], outcome
    assert took < 0.5, f"listen() ended {took:.2f}s after close()"


async def test_a_frozen_listen_statement_is_noticed(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """The listener's connection goes half-open between login and its LISTEN statement
    (a reconnect right into a network fault). Guarantee 7: no await blocks past its
    deadline; the listener should time out (heartbeat_timeout) and reconnect."""
    proxy = tls_chaos_proxy
    assert proxy.dsn is not None
    channel = f"ch_{app_name}"
    got: list[object] = []
    async with pool_for(
        proxy.dsn, app_name, min_size=1, max_size=1, heartbeat_interval=0.3, heartbeat_timeout=0.5
    ) as pool:
        trigger = proxy.on_client_message(b"LISTEN", "freeze_before")

        async def consume() -> None:
            async for item in pool.listen(channel):
                got.append(item)
                if isinstance(item, psycopg.Notify):
                    return

        try:
            with anyio.fail_after(8):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await trigger.wait()
                    while not any(isinstance(i, psycopg.Notify) for i in got):
                        await pool.execute("SELECT pg_notify(%s, 'x')", (channel,))
                        await anyio.sleep(0.1)
        finally:
            print(got)
            proxy.thaw()


async def test_listen_on_a_closed_pool_says_so(pg: PostgresServer, app_name: str) -> None:
    """Every other operation on a closed pool raises PoolClosed; listen() on one ends
    silently, so a consumer loop just stops as if the stream had finished."""
    from aiopg_resilient import PoolClosed

    pool = pool_for(pg.dsn, app_name, min_size=1, max_size=1)
    await pool.open()
    await pool.close()
    items = []
    with anyio.fail_after(5), pytest.raises(PoolClosed):
        async for item in pool.listen("x"):
            items.append(item)


async def test_listeners_do_not_probe_a_down_server_in_parallel(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """Guarantee 6: while the database is down, reconnects are single-flight per pool.
    Five listeners of one pool lose their connections to a black-holed server: each
    probes on its own, so the server gets 5 concurrent connection attempts (plus the
    pool's own)."""
    assert chaos_proxy.dsn is not None
    async with pool_for(
        chaos_proxy.dsn + " connect_timeout=2",
        app_name,
        min_size=0,
        max_size=1,
        heartbeat_interval=0.2,
        heartbeat_timeout=0.3,
    ) as pool:

        async def consume(n: int) -> None:
            async for _ in pool.listen(f"ch_{app_name}_{n}"):
                pass

        try:
            with anyio.move_on_after(6):
                async with anyio.create_task_group() as tg:
                    for n in range(5):
                        tg.start_soon(consume, n)
                    await until(lambda: chaos_proxy.stats.open >= 5)
                    await anyio.sleep(0.2)
                    chaos_proxy.freeze_new(True)
                    await anyio.to_thread.run_sync(chaos_proxy.cut)
                    await anyio.sleep(0.1)
                    chaos_proxy.reset_stats()
                    await anyio.sleep(1.5)
                    peak = chaos_proxy.stats.peak_open
                    tg.cancel_scope.cancel()
        finally:
            chaos_proxy.freeze_new(False)
    print("concurrent probes:", peak)
    assert peak <= 1, f"{peak} concurrent connection attempts to a down server"


# -- re-entrancy ---------------------------------------------------------------------------


async def test_wait_for_inside_a_block_is_refused_at_once(
    pg: PostgresServer, app_name: str
) -> None:
    """asyncio.wait_for() (Python < 3.12) runs the query in a child task: the
    re-entrancy rule exempts it, so instead of the ProgrammingError the same query gets
    without wait_for, it waits for a connection its own parent holds until the timeout."""
    async with ResilientConnection(pg.dsn, name=app_name) as db:
        started = time.monotonic()
        with anyio.fail_after(10):
            async with db.transaction() as conn:
                await conn.execute("SELECT 1")
                with pytest.raises(psycopg.ProgrammingError, match="already holds"):
                    await asyncio.wait_for(db.fetchval("SELECT 2"), 3)
        assert time.monotonic() - started < 1


async def test_close_ends_a_listener_stuck_in_its_listen_statement(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str
) -> None:
    proxy = tls_chaos_proxy
    assert proxy.dsn is not None
    pool = pool_for(
        proxy.dsn, app_name, min_size=1, max_size=1, heartbeat_interval=0.3, heartbeat_timeout=0.5
    )
    await pool.open()
    trigger = proxy.on_client_message(b"LISTEN", "freeze_before")
    outcome: list[object] = []
    ended = anyio.Event()

    async def consume() -> None:
        try:
            async for item in pool.listen(f"ch_{app_name}"):
                outcome.append(item)
            outcome.append("returned")
        except Exception as exc:
            outcome.append(exc)
        finally:
            ended.set()

    try:
        with anyio.fail_after(8):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await trigger.wait()
                started = time.monotonic()
                await pool.close()
                await ended.wait()
                took = time.monotonic() - started
    finally:
        proxy.thaw()
    print(outcome, took)
    assert outcome == ["returned"]
    assert took < 0.5


async def test_notices_during_login(pg: PostgresServer, app_name: str) -> None:
    """A role whose settings make the server talk during login (DEBUG notices): the
    connection is made; its later statement errors are in the default form."""
    role = f"rn_{app_name}"
    await pg.execute(f"DROP ROLE IF EXISTS {role}")
    await pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    await pg.execute(f"ALTER ROLE {role} SET client_min_messages = 'debug5'")
    try:
        with anyio.fail_after(10):
            async with pool_for(
                pg.conninfo(user=role, password="pw"), app_name, min_size=1, max_size=1
            ) as pool:
                assert await pool.fetchval("SELECT 1") == 1
                with pytest.raises(psycopg.errors.UndefinedTable) as caught:
                    await pool.fetch("SELECT * FROM nope_nope")
                assert "LOCATION" not in str(caught.value)
    finally:
        await pg.terminate_backends(application_name=app_name)
        await pg.execute(f"DROP ROLE IF EXISTS {role}")


async def test_login_errors_survive_pickle_and_copy(pg: PostgresServer, app_name: str) -> None:
    """psycopg's errors pickle (a worker returns them across processes); the classes
    made up for login errors (3D000 as OperationalError + InvalidCatalogName) say they
    live in `aiopg_resilient`, where no such name exists."""
    import copy
    import pickle

    with anyio.fail_after(5), pytest.raises(psycopg.OperationalError) as caught:
        await DriverConnection.connect(pg.conninfo(dbname="nosuch_db_x"))
    exc = caught.value
    assert type(copy.copy(exc)) is type(exc)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back).__name__ == type(exc).__name__
    assert back.sqlstate == "3D000"


async def test_listen_with_a_configure_that_turns_autocommit_off(
    pg: PostgresServer, app_name: str
) -> None:
    """configure() may leave the connection out of autocommit (psycopg's default mode);
    the pool copes for its own connections. The listener runs LISTEN inside a
    transaction it never commits: LISTEN never takes effect."""

    async def configure(conn: Conn) -> None:
        await conn.set_autocommit(False)

    channel = f"ch_{app_name}"
    got: list[object] = []
    async with pool_for(
        pg.dsn, app_name, min_size=1, max_size=1, configure=configure, heartbeat_interval=0.3
    ) as pool:
        assert await pool.fetchval("SELECT 1") == 1

        async def consume() -> None:
            async for item in pool.listen(channel):
                got.append(item)
                return

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await until_value(lambda: backends(pg, app_name), 2)
                while not got:
                    await pool.execute("SELECT pg_notify(%s, 'x')", (channel,))
                    await anyio.sleep(0.1)


async def test_prefer_wrong_password_is_fatal_fast(pg: PostgresServer, app_name: str) -> None:
    """sslmode=prefer against hostssl-only pg_hba: libpq retries without SSL after the
    SSL attempt's 28P01 and gets 28000; two messages, the last code wins: FATAL."""
    pool = pool_for(pg.conninfo(password="wrong", sslmode="prefer"), app_name)
    started = time.monotonic()
    with anyio.fail_after(5), pytest.raises(psycopg.OperationalError) as caught:
        await pool.open()
    print(repr(caught.value))
    assert classify(caught.value) is Failure.FATAL
    assert time.monotonic() - started < 1.5
    await pool.close()
