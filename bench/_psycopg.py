"""Contenders b, c, f (psycopg_pool: default, autocommit, autocommit with ``check``) and d
(raw psycopg: held connections, no pool)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import psycopg_pool
from _common import INSERT, QUERY, SETUP_TIMEOUT, TLS_QUERY, Subject, Target


async def _fetchval(conn: psycopg.AsyncConnection[Any], query: str = QUERY) -> Any:
    cur = await conn.execute(query)
    row = await cur.fetchone()
    return None if row is None else row[0]


async def _fetchrow(conn: psycopg.AsyncConnection[Any], query: str) -> Any:
    cur = await conn.execute(query)
    return await cur.fetchone()


@contextlib.asynccontextmanager
async def open_psycopg_pool(
    target: Target,
    size: int,
    kwargs: dict[str, Any] | None = None,
    check: Callable[[psycopg.AsyncConnection[Any]], Any] | None = None,
) -> AsyncIterator[Subject]:
    pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
        target.dsn, min_size=size, max_size=size, kwargs=kwargs, check=check, open=False
    )
    await pool.open(wait=True, timeout=SETUP_TIMEOUT)
    try:

        async def op(_: int) -> Any:
            async with pool.connection() as conn:
                return await _fetchval(conn)

        async def borrow() -> None:
            async with pool.connection():
                pass

        async def tls() -> Any:
            async with pool.connection() as conn:
                return await _fetchrow(conn, TLS_QUERY)

        async def insert(_: int, key: str) -> None:
            async with pool.connection() as conn:
                await conn.execute(INSERT, (key,))

        async def transaction(_: int, key: str) -> None:
            async with pool.connection() as conn, conn.transaction():
                await conn.execute(INSERT, (key,))

        yield Subject(op, tls, borrow, {"insert": insert, "transaction": transaction})
    finally:
        await pool.close()


def open_psycopg_pool_autocommit(
    target: Target, size: int
) -> contextlib.AbstractAsyncContextManager[Subject]:
    return open_psycopg_pool(target, size, kwargs={"autocommit": True})


def open_psycopg_pool_check(
    target: Target, size: int
) -> contextlib.AbstractAsyncContextManager[Subject]:
    return open_psycopg_pool(
        target,
        size,
        kwargs={"autocommit": True},
        check=psycopg_pool.AsyncConnectionPool.check_connection,
    )


@contextlib.asynccontextmanager
async def open_raw(target: Target, size: int) -> AsyncIterator[Subject]:
    """*size* held connections (autocommit). Task i always uses connection i % size, behind
    that connection's lock (none at size 1). A connection found closed is reopened before
    use: the minimum a hand-written application does to survive a reconnect."""
    conns: list[psycopg.AsyncConnection[Any]] = []

    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(target.dsn, autocommit=True)

    async def reopen(k: int) -> psycopg.AsyncConnection[Any]:
        conns[k] = await connect()
        return conns[k]

    try:
        for _ in range(size):
            conns.append(await connect())
        locks = [asyncio.Lock() for _ in conns]
        if size == 1:
            # One task, one connection: nothing to serialise.
            async def op(i: int) -> Any:
                conn = conns[0]
                return await _fetchval(conn if not conn.closed else await reopen(0))

        else:

            async def op(i: int) -> Any:
                k = i % size
                async with locks[k]:
                    conn = conns[k]
                    return await _fetchval(conn if not conn.closed else await reopen(k))

        async def borrow() -> None:
            async with locks[0]:
                pass

        async def insert(i: int, key: str) -> None:
            k = i % size
            async with locks[k]:
                conn = conns[k] if not conns[k].closed else await reopen(k)
                await conn.execute(INSERT, (key,))

        async def transaction(i: int, key: str) -> None:
            k = i % size
            async with locks[k]:
                conn = conns[k] if not conns[k].closed else await reopen(k)
                async with conn.transaction():
                    await conn.execute(INSERT, (key,))

        yield Subject(
            op=op,
            tls=lambda: _fetchrow(conns[0], TLS_QUERY),
            borrow=borrow,
            writes={"insert": insert, "transaction": transaction},
        )
    finally:
        for conn in conns:
            await conn.close()
