"""ResilientConnection: one self-healing connection, and listen() across reconnects."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest

from aiopg_resilient import Reconnected, ResilientConnection
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import until


async def test_reads_and_writes_survive_termination(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """Reads and writes on a ResilientConnection go through a terminated backend."""
    async with ResilientConnection(pg.dsn, name=app_name) as db:
        await db.execute(f"INSERT INTO {table} VALUES ('a', 1)")
        await pg.terminate_backends(application_name=app_name)
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 1
        await pg.terminate_backends(application_name=app_name)
        await db.execute(f"INSERT INTO {table} VALUES ('b', 2)")
        async with db.transaction() as conn:
            await conn.execute(f"INSERT INTO {table} VALUES ('c', 3)")
        assert db.stats.size == 1
    assert await pg.execute(f"SELECT k FROM {table} ORDER BY k") == [("a",), ("b",), ("c",)]


async def test_configure_is_reapplied_after_reconnect(pg: PostgresServer, app_name: str) -> None:
    """Session state set by configure() is there again after a reconnect; other SETs are not."""

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SET search_path = pg_catalog, public")

    async with ResilientConnection(pg.dsn, name=app_name, configure=configure) as db:
        await db.execute("SET work_mem = '7MB'", idempotent=True)
        assert await db.fetchval("SHOW work_mem") == "7MB"
        await pg.terminate_backends(application_name=app_name)
        assert await db.fetchval("SHOW search_path") == "pg_catalog, public"
        assert await db.fetchval("SHOW work_mem") == "4MB"  # lost with the old session


async def test_listen_survives_three_cuts(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """A LISTEN consumer keeps receiving notifications across three cuts and gets a
    Reconnected marker after each."""
    assert chaos_proxy.dsn is not None
    received: list[str] = []
    markers: list[Reconnected] = []
    after_last_marker = 0

    async def produce(stop: anyio.Event) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            await pg.execute("SELECT pg_notify('jobs', %s)", (str(i),))
            await anyio.sleep(0.02)

    async with ResilientConnection(
        chaos_proxy.dsn, name=app_name, heartbeat_interval=0.5, heartbeat_timeout=0.5
    ) as db:
        stop = anyio.Event()

        async def consume() -> None:
            nonlocal after_last_marker
            async for item in db.listen("jobs"):
                if isinstance(item, Reconnected):
                    markers.append(item)
                    after_last_marker = 0
                else:
                    received.append(item.payload)
                    after_last_marker += 1
                    # the consumer can query while iterating: listen has its own connection
                    if len(received) % 25 == 0:
                        assert await db.fetchval("SELECT 1") == 1
                if len(markers) == 3 and after_last_marker >= 10:
                    return

        async def cut_three_times() -> None:
            for _ in range(3):
                await until(lambda: len(received) >= 10 * (len(markers) + 1), timeout=10)
                await anyio.to_thread.run_sync(chaos_proxy.cut)
                seen = len(markers)
                await until(lambda seen=seen: len(markers) > seen, timeout=10)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce, stop)
                tg.start_soon(cut_three_times)
                await consume()
                stop.set()
    assert len(markers) == 3
    assert all(m.channels == ("jobs",) and m.downtime >= 0 for m in markers)
    assert after_last_marker >= 10
    assert len(set(received)) == len(received)  # nothing delivered twice


async def test_listen_notices_a_frozen_connection(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """An idle listener whose connection went half-open reconnects via its heartbeat."""
    assert chaos_proxy.dsn is not None
    items: list[object] = []
    async with ResilientConnection(
        chaos_proxy.dsn, name=app_name, heartbeat_interval=0.2, heartbeat_timeout=0.3
    ) as db:

        async def consume() -> None:
            async for item in db.listen("quiet"):
                items.append(item)
                return

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                # the pool's connection and the listener's
                await until(lambda: chaos_proxy.stats.open >= 2)
                await anyio.sleep(0.1)
                await anyio.to_thread.run_sync(chaos_proxy.freeze)
        await anyio.to_thread.run_sync(chaos_proxy.thaw)
    assert len(items) == 1
    assert isinstance(items[0], Reconnected)
    assert "TimeoutError" in items[0].cause


def test_listen_needs_a_channel() -> None:
    """listen() without channels is a caller error."""
    db = ResilientConnection("")
    with pytest.raises(ValueError, match="channel"):
        db.listen().__aiter__().__anext__().send(None)
