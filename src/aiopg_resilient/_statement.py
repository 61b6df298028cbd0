"""One statement of the caller's and how its result is read off the cursor."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from psycopg import AsyncCursor, sql
from psycopg.abc import Params
from psycopg.rows import tuple_row

from ._driver import DriverConnection

__all__ = ["Query", "Statement", "all_rows", "one_row", "rowcount", "several", "value"]

T = TypeVar("T")
Query = str | bytes | sql.SQL | sql.Composed


async def all_rows(cur: AsyncCursor[Any]) -> list[Any]:
    return await cur.fetchall()


async def one_row(cur: AsyncCursor[Any]) -> Any:
    return await cur.fetchone()


async def value(cur: AsyncCursor[Any]) -> Any:
    row = await cur.fetchone()
    return None if row is None else row[0]


async def rowcount(cur: AsyncCursor[Any]) -> int:
    return cur.rowcount


@dataclass(frozen=True)
class Statement(Generic[T]):
    """One statement and how to read its result off the cursor."""

    query: Query
    params: Params | None
    collect: Callable[[AsyncCursor[Any]], Awaitable[T]]
    user_rows: bool = True
    """Rows in the user's row_factory (fetch, fetchone), or plain tuples (fetchval)."""

    def size(self) -> int:
        """About how many bytes the request is (for the silent-path watch)."""
        query = self.query
        total = len(query) if isinstance(query, (str, bytes)) else 0
        params = self.params
        values = params.values() if isinstance(params, Mapping) else params or ()
        return total + sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in values)

    def cursor(self, conn: DriverConnection) -> AsyncCursor[Any]:
        return conn.cursor() if self.user_rows else conn.cursor(row_factory=tuple_row)

    async def run(self, conn: DriverConnection) -> T:
        cur = self.cursor(conn)
        await cur.execute(self.query, self.params)
        return await self.collect(cur)


def several(query: Query, conn: DriverConnection | None) -> bool:
    """Whether the query text (before its parameters are bound: a ';' in a value is
    data) may hold several statements; composed SQL without *conn* to render it: yes."""
    if isinstance(query, bytes):
        text = query.decode(errors="replace")
    elif isinstance(query, str):
        text = query
    elif conn is None:
        return True
    else:
        text = query.as_string(conn)
    return ";" in text.strip().rstrip(";")
