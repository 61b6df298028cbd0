"""The throughput contenders of bench_reads.py (a-e): how each one is opened with n
connections, the ``SELECT 1`` operation it is timed on and the probe of its TLS session."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import psycopg_pool
from _common import FINISH_TIMEOUT, QUERY, SETUP_TIMEOUT

from aiopg_resilient import ResilientPool
from aiopg_resilient.testing import PostgresServer

TLS_QUERY = "SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"

Op = Callable[[int], Awaitable[Any]]  # op(task_index)


@dataclass
class Subject:
    """An opened contender: the operation to time and a probe of its TLS session."""

    op: Op
    tls: Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Contender:
    key: str
    name: str
    describe: str
    open: Callable[[PostgresServer, int], contextlib.AbstractAsyncContextManager[Subject]]


async def _bounded(what: str, cond: Callable[[], bool], timeout: float = SETUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def open_resilient(pg: PostgresServer, size: int) -> AsyncIterator[Subject]:
    async with ResilientPool(pg.dsn, min_size=size, max_size=size, name="bench") as pool:
        await _bounded(f"ResilientPool size {size}", lambda: pool.stats.size == size)

        async def op(_: int) -> Any:
            return await pool.fetchval(QUERY)

        yield Subject(op=op, tls=lambda: pool.fetchone(TLS_QUERY))


@contextlib.asynccontextmanager
async def open_psycopg_pool(
    pg: PostgresServer, size: int, kwargs: dict[str, Any] | None = None
) -> AsyncIterator[Subject]:
    pool = psycopg_pool.AsyncConnectionPool(
        pg.dsn, min_size=size, max_size=size, kwargs=kwargs, open=False
    )
    await pool.open(wait=True, timeout=SETUP_TIMEOUT)
    try:

        async def op(_: int) -> None:
            async with pool.connection() as conn:
                await conn.execute(QUERY)

        async def tls() -> Any:
            async with pool.connection() as conn:
                cur = await conn.execute(TLS_QUERY)
                return await cur.fetchone()

        yield Subject(op=op, tls=tls)
    finally:
        await pool.close()


def open_psycopg_pool_autocommit(
    pg: PostgresServer, size: int
) -> contextlib.AbstractAsyncContextManager[Subject]:
    return open_psycopg_pool(pg, size, kwargs={"autocommit": True})


@contextlib.asynccontextmanager
async def open_raw(pg: PostgresServer, size: int) -> AsyncIterator[Subject]:
    conns: list[psycopg.AsyncConnection[Any]] = []
    try:
        for _ in range(size):
            conns.append(await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True))
        if size == 1:
            # One task, one connection: nothing to serialise.
            conn = conns[0]

            async def op(i: int) -> None:
                await conn.execute(QUERY)

        else:
            # Task i always uses connection i % size, behind that connection's lock
            # (with 32 tasks and 8 connections: 4 tasks share each connection).
            locks = [asyncio.Lock() for _ in conns]

            async def op(i: int) -> None:
                k = i % size
                async with locks[k]:
                    await conns[k].execute(QUERY)

        async def tls() -> Any:
            cur = await conns[0].execute(TLS_QUERY)
            return await cur.fetchone()

        yield Subject(op=op, tls=tls)
    finally:
        for conn in conns:
            await conn.close()


def _asyncpg_ssl(pg: PostgresServer) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pg.ca_path))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@contextlib.asynccontextmanager
async def open_asyncpg(pg: PostgresServer, size: int) -> AsyncIterator[Subject]:
    pool = await asyncpg.create_pool(
        host=pg.host,
        port=pg.port,
        user=pg.user,
        password=pg.password,
        database=pg.dbname,
        ssl=_asyncpg_ssl(pg),
        min_size=size,
        max_size=size,
        timeout=SETUP_TIMEOUT,
    )
    try:

        async def op(_: int) -> Any:
            return await pool.fetchval(QUERY)

        async def tls() -> Any:
            row = await pool.fetchrow(TLS_QUERY)
            return None if row is None else tuple(row)

        yield Subject(op=op, tls=tls)
    finally:
        await asyncio.wait_for(pool.close(), FINISH_TIMEOUT)


CONTENDERS: tuple[Contender, ...] = (
    Contender(
        "a",
        "aiopg_resilient",
        'ResilientPool(min=max=n), defaults (heartbeat on): await pool.fetchval("SELECT 1")',
        open_resilient,
    ),
    Contender(
        "b",
        "psycopg_pool",
        "AsyncConnectionPool(min=max=n), default kwargs (not autocommit): "
        'async with pool.connection() as conn: await conn.execute("SELECT 1")',
        open_psycopg_pool,
    ),
    Contender(
        "c",
        "psycopg_pool autocommit",
        'same as b with kwargs={"autocommit": True}',
        open_psycopg_pool_autocommit,
    ),
    Contender(
        "d",
        "raw psycopg (held)",
        "n held AsyncConnection(autocommit); at 32 tasks task i uses connection i % 8 "
        "behind an asyncio.Lock per connection",
        open_raw,
    ),
    Contender(
        "e",
        "asyncpg pool",
        'asyncpg.create_pool(min=max=n, ssl=SSLContext): await pool.fetchval("SELECT 1")',
        open_asyncpg,
    ),
)
BASELINE = "b"
