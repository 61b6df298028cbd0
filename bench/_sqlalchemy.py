"""Contender g: SQLAlchemy's async engine on the psycopg driver with ``pool_pre_ping=True``,
as its documentation recommends against stale connections. Everything left at SQLAlchemy's
defaults: not autocommit, so a read is a ping, BEGIN, ``SELECT 1`` and a ROLLBACK when the
connection goes back; a write is ``engine.begin()`` (BEGIN, INSERT, COMMIT)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from _common import INSERT_NAMED, QUERY, SETUP_TIMEOUT, TLS_QUERY, Subject, Target
from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import create_async_engine


def engine_url(target: Target) -> URL:
    """``postgresql+psycopg://`` with the target's login and ``sslmode=verify-full``."""
    query = {"sslmode": "verify-full"}
    if target.ca_path is not None:
        query["sslrootcert"] = str(target.ca_path)
    return URL.create(
        "postgresql+psycopg",
        username=target.user,
        password=target.password,
        host=target.host,
        port=target.port,
        database=target.dbname,
        query=query,
    )


@contextlib.asynccontextmanager
async def open_sqlalchemy(target: Target, size: int) -> AsyncIterator[Subject]:
    engine = create_async_engine(
        engine_url(target),
        pool_size=size,
        max_overflow=0,
        pool_pre_ping=True,
        pool_timeout=SETUP_TIMEOUT,
    )
    try:
        # The engine connects lazily: hold n connections at once to fill its pool.
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(size):
                await stack.enter_async_context(engine.connect())
        query = text(QUERY)
        insert_stmt = text(INSERT_NAMED)

        async def op(_: int) -> Any:
            async with engine.connect() as conn:
                return (await conn.execute(query)).scalar()

        async def borrow() -> None:
            async with engine.connect():
                pass

        async def tls() -> Any:
            async with engine.connect() as conn:
                return tuple((await conn.execute(text(TLS_QUERY))).one())

        async def insert(_: int, key: str) -> None:
            async with engine.begin() as conn:
                await conn.execute(insert_stmt, {"k": key})

        yield Subject(op, tls, borrow, {"insert": insert, "transaction": insert})
    finally:
        await engine.dispose()
