"""The three ways the demo runs the same workload.

* ``plain``: plain psycopg, one connection per worker, in autocommit; a write is
  ``async with conn.transaction(): INSERT``. After an error the worker drops its connection
  and makes a new one for its next operation; the error reaches the application.
* ``advice``: the usual advice for ``SSL connection has been closed unexpectedly``: the
  same, plus reconnect and retry every statement, writes included (the INSERT with its
  COMMIT), on ``OperationalError`` with exponential backoff (5 attempts, 0.1 s doubling to
  0.8 s), like a ``@retry(retry_if_exception_type(OperationalError), ...)`` decorator.
* ``pool``: one `ResilientPool` for every worker: reads through ``fetchval``, writes through
  ``execute`` and ``run_transaction`` (every other write), as the README recommends.

Each contender opens as an async context manager yielding one `Client` per worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import anyio
import psycopg
from psycopg import sql

from ... import PoolStats, ResilientPool

__all__ = ["CONTENDERS", "TABLE", "Client", "Contender", "Opened"]

TABLE = "demo_writes"
"""Every write inserts ``(contender, op_id)`` here: no unique constraint, so a write applied
twice shows as two rows."""

_READ = "SELECT %s::bigint"
_WRITE = sql.SQL("INSERT INTO {} (contender, op_id) VALUES (%s, %s)").format(sql.Identifier(TABLE))

_ATTEMPTS = 5
_FIRST_DELAY = 0.1
_CONNECT_TIMEOUT = 5

_T = TypeVar("_T")


class Client(Protocol):
    """What a worker does its operations with."""

    async def read(self, value: int) -> Any:
        """``SELECT value``: return what the server answered."""

    async def write(self, op_id: int) -> None:
        """Insert the row of write `op_id`, committed."""


@dataclass
class Opened:
    """An open contender: a client per worker, and what it can say about its run after."""

    clients: list[Client]
    notes: Callable[[], list[str]] = list


@dataclass(frozen=True)
class Contender:
    """One way of running the workload."""

    key: str
    label: str
    how: str
    open: Callable[[str, int], contextlib.AbstractAsyncContextManager[Opened]]
    """``open(dsn, workers)``."""


class _OwnConnection:
    """One worker's psycopg connection: made when needed, dropped after an error."""

    def __init__(self, dsn: str, key: str) -> None:
        self._dsn = dsn
        self._key = key
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def _get(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None:
            self._conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT
            )
        return self._conn

    async def drop(self) -> None:
        """Close the connection (whatever its state); the next operation makes a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.move_on_after(_CONNECT_TIMEOUT, shield=True), contextlib.suppress(Exception):
                await conn.close()

    async def read(self, value: int) -> Any:
        conn = await self._get()
        cur = await conn.execute(_READ, (value,))
        row = await cur.fetchone()
        return None if row is None else row[0]

    async def write(self, op_id: int) -> None:
        conn = await self._get()
        async with conn.transaction():
            await conn.execute(_WRITE, (self._key, op_id))


class _PlainClient:
    """Plain psycopg: the error reaches the application; the next operation reconnects."""

    def __init__(self, dsn: str, key: str) -> None:
        self.conn = _OwnConnection(dsn, key)

    async def _once(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await fn()
        except BaseException:
            await self.conn.drop()
            raise

    async def read(self, value: int) -> Any:
        return await self._once(lambda: self.conn.read(value))

    async def write(self, op_id: int) -> None:
        await self._once(lambda: self.conn.write(op_id))


class _AdviceClient(_PlainClient):
    """The usual advice: on OperationalError, reconnect and run the operation again."""

    async def _retried(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        for attempt in range(_ATTEMPTS):
            try:
                return await self._once(fn)
            except psycopg.OperationalError:
                if attempt == _ATTEMPTS - 1:
                    raise
            await anyio.sleep(_FIRST_DELAY * 2**attempt)
        raise AssertionError("unreachable")

    async def read(self, value: int) -> Any:
        return await self._retried(lambda: self.conn.read(value))

    async def write(self, op_id: int) -> None:
        await self._retried(lambda: self.conn.write(op_id))


@contextlib.asynccontextmanager
async def _own_connections(
    dsn: str, workers: int, key: str, client: type[_PlainClient]
) -> AsyncIterator[Opened]:
    clients = [client(dsn, key) for _ in range(workers)]
    try:
        yield Opened(list[Client](clients))
    finally:
        for c in clients:
            await c.conn.drop()


def _plain(dsn: str, workers: int) -> contextlib.AbstractAsyncContextManager[Opened]:
    return _own_connections(dsn, workers, "plain", _PlainClient)


def _advice(dsn: str, workers: int) -> contextlib.AbstractAsyncContextManager[Opened]:
    return _own_connections(dsn, workers, "advice", _AdviceClient)


async def _insert(conn: psycopg.AsyncConnection[Any], op_id: int) -> None:
    await conn.execute(_WRITE, ("pool", op_id))


class _PoolClient:
    def __init__(self, pool: ResilientPool) -> None:
        self._pool = pool

    async def read(self, value: int) -> Any:
        return await self._pool.fetchval(_READ, (value,))

    async def write(self, op_id: int) -> None:
        if op_id % 2:
            await self._pool.execute(_WRITE, ("pool", op_id))
        else:
            await self._pool.run_transaction(_insert, op_id)


def _pool_notes(stats: PoolStats) -> list[str]:
    return [
        f"pool: connections made {stats.connects}, found dead {stats.connections_lost}; "
        f"operations re-run where that was safe {stats.retries}",
        f"pool: COMMITs in doubt resolved through the transaction id {stats.commits_resolved}, "
        f"unknowable (CommitUnknown) {stats.commits_unknown}",
    ]


@contextlib.asynccontextmanager
async def _pool(dsn: str, workers: int) -> AsyncIterator[Opened]:
    async with ResilientPool(dsn, min_size=min(2, workers), max_size=workers, name="demo") as pool:
        client = _PoolClient(pool)
        yield Opened([client] * workers, lambda: _pool_notes(pool.stats))


CONTENDERS: tuple[Contender, ...] = (
    Contender(
        "plain",
        "plain psycopg",
        "one connection per worker, a new one after an error; errors reach the application",
        _plain,
    ),
    Contender(
        "advice",
        "usual advice",
        f"the same, but every operation (writes too) is retried after reconnecting, "
        f"{_ATTEMPTS} attempts, backoff from {_FIRST_DELAY:g} s",
        _advice,
    ),
    Contender(
        "pool",
        "ResilientPool",
        "one pool: reads through fetchval(), writes through execute() and run_transaction()",
        _pool,
    ),
)
