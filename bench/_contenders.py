"""The contenders (a-g): their keys, names and openers, and aiopg_resilient's opener (a).
An opener opens a contender with n connections on a `Target` and yields a `Subject`: a read
(``SELECT 1``, answer returned), a borrow-and-return, a TLS probe and its writes of one
row. Every part (throughput, acquire, writes, faults) uses these. The others' openers:
`_psycopg` (b, c, d, f), `_asyncpg` (e), `_sqlalchemy` (g)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from _asyncpg import open_asyncpg
from _common import INSERT, QUERY, SETUP_TIMEOUT, TLS_QUERY, Subject, Target
from _psycopg import (
    open_psycopg_pool,
    open_psycopg_pool_autocommit,
    open_psycopg_pool_check,
    open_raw,
)
from _sqlalchemy import open_sqlalchemy

from aiopg_resilient import ResilientPool

Opener = Callable[[Target, int], contextlib.AbstractAsyncContextManager[Subject]]


@dataclass(frozen=True)
class Contender:
    key: str
    name: str
    describe: str
    open: Opener


async def _bounded(what: str, cond: Callable[[], bool], timeout: float = SETUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def open_resilient(target: Target, size: int) -> AsyncIterator[Subject]:
    async with ResilientPool(target.dsn, min_size=size, max_size=size, name="bench") as pool:
        await _bounded(f"ResilientPool size {size}", lambda: pool.stats.size == size)

        async def op(_: int) -> Any:
            return await pool.fetchval(QUERY)

        async def borrow() -> None:
            async with pool.connection():
                pass

        async def insert(_: int, key: str) -> None:
            await pool.execute(INSERT, (key,))  # write-safe: never doubled, never lost

        async def idempotent(_: int, key: str) -> None:
            await pool.execute(INSERT, (key,), idempotent=True)

        async def transaction(_: int, key: str) -> None:
            async with pool.transaction() as conn:
                await conn.execute(INSERT, (key,))

        yield Subject(
            op=op,
            tls=lambda: pool.fetchone(TLS_QUERY),
            borrow=borrow,
            writes={"insert": insert, "transaction": transaction, "idempotent": idempotent},
        )


CONTENDERS: tuple[Contender, ...] = (
    Contender(
        "a",
        "aiopg_resilient",
        "ResilientPool(min=max=n), defaults (heartbeat on): await pool.fetchval(...); "
        "writes: write-safe pool.execute(), pool.transaction()",
        open_resilient,
    ),
    Contender(
        "b",
        "psycopg_pool",
        "AsyncConnectionPool(min=max=n), default kwargs (not autocommit): "
        "async with pool.connection() as conn: await conn.execute(...)",
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
        "raw psycopg",
        "n held AsyncConnection(autocommit), reopened when found closed; with n > 1 task i "
        "uses connection i % n behind an asyncio.Lock per connection",
        open_raw,
    ),
    Contender(
        "e",
        "asyncpg pool",
        "asyncpg.create_pool(min=max=n, ssl=SSLContext): await pool.fetchval(...)",
        open_asyncpg,
    ),
    Contender(
        "f",
        "psycopg_pool check",
        "same as c with check=AsyncConnectionPool.check_connection (an empty query at "
        "every checkout)",
        open_psycopg_pool_check,
    ),
    Contender(
        "g",
        "SQLAlchemy pre_ping",
        "create_async_engine('postgresql+psycopg://...', pool_size=n, max_overflow=0, "
        "pool_pre_ping=True): async with engine.connect() as conn: await conn.execute(...)",
        open_sqlalchemy,
    ),
)
BASELINE = "b"


def pick(keys: str | list[str] | None) -> list[Contender]:
    """The contenders with these keys (all of them for None), in CONTENDERS' order."""
    if keys is None:
        return list(CONTENDERS)
    return [c for c in CONTENDERS if c.key in keys]
