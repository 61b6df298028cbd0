"""The PgBouncer test bed (`aiopg_resilient.testing.PgBouncer`) in front of the session's server."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import psycopg.errors
import pytest
import pytest_asyncio

from aiopg_resilient.testing import (
    PgBouncer,
    PostgresServer,
    ServerControlUnavailable,
    _pgbouncer_proc,
)

from .conftest import until_value


async def _open(bed: PgBouncer) -> PgBouncer:
    try:
        await bed.open()
    except ServerControlUnavailable as exc:
        pytest.skip(str(exc))
    return bed


@pytest_asyncio.fixture
async def bouncer(pg: PostgresServer) -> AsyncIterator[PgBouncer]:
    """A PgBouncer in transaction mode in front of `pg`."""
    async with await _open(PgBouncer(pg)) as bed:
        yield bed


async def _connect(dsn: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, **kwargs)


async def _backend_pid(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT pg_backend_pid()")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _pool(bed: PgBouncer) -> dict[str, Any]:
    """The SHOW POOLS row of the server's database, by column name."""
    async with await _connect(bed.admin_dsn) as conn:
        cur = await conn.execute("SHOW POOLS")
        names = [column.name for column in cur.description or ()]
        rows = [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
    (pool,) = [row for row in rows if row["database"] == bed.server.dbname]
    return pool


async def _clients(bed: PgBouncer) -> int:
    return int((await _pool(bed))["cl_active"])


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
async def test_connects_through_pgbouncer_with_tls_to_the_server(
    pg: PostgresServer, pool_mode: Any
) -> None:
    with anyio.fail_after(10):
        async with await _open(PgBouncer(pg, pool_mode=pool_mode)) as bed:
            assert f"port={bed.port}" in bed.dsn
            assert "sslmode=disable" in bed.dsn
            assert bed.conninfo(application_name="x").endswith("application_name=x")
            async with await _connect(bed.dsn, prepare_threshold=None) as conn:
                cur = await conn.execute(
                    "SELECT ssl, current_user FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                )
                assert await cur.fetchall() == [(True, pg.user)]
                rows = await bed.admin("SHOW POOLS")
                assert any(row[0] == pg.dbname and row[-1] == pool_mode for row in rows)
                server_side = "sv_active" if pool_mode == "session" else "sv_idle"
                assert (await _pool(bed))[server_side] == 1
            assert (await bed.admin("SHOW VERSION"))[0][0].startswith("PgBouncer")


def test_sync_context_manager_and_close_leave_no_process(pg: PostgresServer) -> None:
    try:
        bed = PgBouncer(pg, pool_mode="session", settings={"default_pool_size": "3"})
        bed.open_sync()
    except ServerControlUnavailable as exc:
        pytest.skip(str(exc))
    with bed:
        pid = bed.pid
        assert pid is not None
        assert int(bed.pid_path.read_text().split()[0]) == pid
        root = bed.log_path.parent
        with psycopg.connect(bed.dsn) as conn:
            assert conn.execute("SELECT 1").fetchall() == [(1,)]
        assert ("default_pool_size", "3") in [row[:2] for row in bed.admin_sync("SHOW CONFIG")]
        assert "login attempt" in bed.log_path.read_text()
    assert not bed.running
    assert not root.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="closed"):
        bed.open_sync()


async def test_pause_waits_for_transactions_and_holds_queries_until_resume(
    bouncer: PgBouncer,
) -> None:
    with anyio.fail_after(10):
        async with await _connect(bouncer.dsn) as busy, await _connect(bouncer.dsn) as waiter:
            await busy.execute("BEGIN")
            await busy.execute("SELECT 1")
            paused = anyio.Event()
            result: list[Any] = []

            async def pause() -> None:
                await bouncer.admin("PAUSE")
                paused.set()

            async def query() -> None:
                cur = await waiter.execute("SELECT 42")
                result.extend(await cur.fetchall())

            async with anyio.create_task_group() as tg:
                tg.start_soon(pause)
                await anyio.sleep(0.3)
                assert not paused.is_set()  # PAUSE waits for the open transaction
                await busy.execute("COMMIT")
                await paused.wait()
                tg.start_soon(query)
                await anyio.sleep(0.3)
                assert result == []  # queries wait while paused
                assert (await _pool(bouncer))["cl_waiting"] == 1
                await bouncer.admin("RESUME")
            assert result == [(42,)]


async def test_reconnect_replaces_server_connections(bouncer: PgBouncer) -> None:
    with anyio.fail_after(10):
        async with await _connect(bouncer.dsn) as conn:
            before = await _backend_pid(conn)
            assert await _backend_pid(conn) == before
            await bouncer.admin("RECONNECT")
            assert await _backend_pid(conn) != before


async def test_kill_drops_clients_until_resume(bouncer: PgBouncer) -> None:
    with anyio.fail_after(10):
        conn = await _connect(bouncer.dsn)
        await conn.execute("SELECT 1")
        await bouncer.admin(f"KILL {bouncer.server.dbname}")
        with pytest.raises(psycopg.errors.ProtocolViolation, match="database removed"):
            await conn.execute("SELECT 1")
        await conn.close()
        await bouncer.admin(f"RESUME {bouncer.server.dbname}")
        async with await _connect(bouncer.dsn) as again:
            await again.execute("SELECT 1")


async def test_set_client_idle_timeout_takes_effect(bouncer: PgBouncer) -> None:
    with anyio.fail_after(10):
        await anyio.to_thread.run_sync(lambda: bouncer.set_sync("client_idle_timeout", "1"))
        config = {row[0]: row[1] for row in await bouncer.admin("SHOW CONFIG")}
        assert config["client_idle_timeout"] == "1"
        async with await _connect(bouncer.dsn) as conn:
            await conn.execute("SELECT 1")
            assert await _clients(bouncer) == 1
            await until_value(lambda: _clients(bouncer), 0, timeout=5)  # closed by PgBouncer
            with pytest.raises(psycopg.errors.ProtocolViolation, match="client_idle_timeout"):
                await conn.execute("SELECT 1")
            assert conn.broken


async def test_restart_keeps_the_port_and_settings(bouncer: PgBouncer) -> None:
    with anyio.fail_after(15):
        port, pid = bouncer.port, bouncer.pid
        await bouncer.set("server_lifetime", "5")
        async with await _connect(bouncer.dsn) as conn:
            await conn.execute("SELECT 1")
            await bouncer.restart()
            with pytest.raises(psycopg.OperationalError):
                await conn.execute("SELECT 1")
        assert bouncer.port == port
        assert bouncer.running
        assert bouncer.pid != pid
        async with await _connect(bouncer.dsn) as conn:
            assert await (await conn.execute("SELECT 1")).fetchall() == [(1,)]
        config = {row[0]: row[1] for row in await bouncer.admin("SHOW CONFIG")}
        assert config["server_lifetime"] == "5"
        await bouncer.stop()
        assert not bouncer.running
        assert bouncer.pid is None
        with pytest.raises(psycopg.OperationalError):
            await _connect(bouncer.dsn, connect_timeout=2)
        await bouncer.start()
        assert bouncer.port == port
        async with await _connect(bouncer.dsn) as conn:
            await conn.execute("SELECT 1")


async def test_default_prepare_threshold_breaks_in_transaction_mode(pg: PostgresServer) -> None:
    """PgBouncer 1.18 does not track prepared statements: psycopg's automatic ones leak."""
    with anyio.fail_after(10):
        async with await _open(PgBouncer(pg, settings={"default_pool_size": "1"})) as bed:
            # The first client's statements stay prepared on the (only) server connection...
            async with await _connect(bed.dsn) as conn:
                for _ in range(10):
                    await conn.execute("SELECT 1")
            # ... where the next client, whose psycopg names its first one "_pg3_0" too, fails.
            async with await _connect(bed.dsn) as conn:
                with pytest.raises(psycopg.errors.DuplicatePreparedStatement, match="_pg3_0"):
                    for _ in range(10):
                        await conn.execute("SELECT 1")
            async with await _connect(bed.dsn, prepare_threshold=None) as conn:
                for _ in range(10):
                    await conn.execute("SELECT 1")


def test_missing_pgbouncer_is_reported(
    pg: PostgresServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(_pgbouncer_proc, "_BINARY_PLACES", (str(tmp_path / "pgbouncer"),))
    assert not PgBouncer.available()
    with pytest.raises(ServerControlUnavailable, match="apt-get install pgbouncer"):
        PgBouncer(pg).open_sync()


def test_bad_arguments(pg: PostgresServer) -> None:
    with pytest.raises(ValueError, match="pool_mode"):
        PgBouncer(pg, pool_mode="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="setting name"):
        PgBouncer(pg, settings={"bad name": "1"})
    with pytest.raises(RuntimeError, match="not open"):
        _ = PgBouncer(pg).dsn


def test_start_failure_shows_the_log(pg: PostgresServer) -> None:
    if not PgBouncer.available():
        pytest.skip("PgBouncer is not installed")
    bed = PgBouncer(pg, settings={"max_client_conn": "abc"})
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 1.*invalid value \"abc\""):
        bed.open_sync()
    assert not bed.running
    with PgBouncer(pg) as good, pytest.raises(psycopg.errors.ProtocolViolation, match="SET"):
        good.set_sync("client_idle_timeout", "abc")
