"""Contender e: asyncpg's pool, over TLS with an `ssl.SSLContext` trusting the test CA."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from _common import FINISH_TIMEOUT, INSERT_DOLLAR, QUERY, SETUP_TIMEOUT, TLS_QUERY, Subject, Target


def _asyncpg_ssl(target: Target) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=None if target.ca_path is None else str(target.ca_path))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@contextlib.asynccontextmanager
async def open_asyncpg(target: Target, size: int) -> AsyncIterator[Subject]:
    pool = await asyncpg.create_pool(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password,
        database=target.dbname,
        ssl=_asyncpg_ssl(target),
        min_size=size,
        max_size=size,
        timeout=SETUP_TIMEOUT,
    )
    try:

        async def op(_: int) -> Any:
            return await pool.fetchval(QUERY)

        async def borrow() -> None:
            async with pool.acquire():
                pass

        async def tls() -> Any:
            row = await pool.fetchrow(TLS_QUERY)
            return None if row is None else tuple(row)

        async def insert(_: int, key: str) -> None:
            await pool.execute(INSERT_DOLLAR, key)

        async def transaction(_: int, key: str) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(INSERT_DOLLAR, key)

        yield Subject(op, tls, borrow, {"insert": insert, "transaction": transaction})
    finally:
        await asyncio.wait_for(pool.close(), FINISH_TIMEOUT)
