"""ResilientConnection: one self-healing connection, and listen() that survives reconnects."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import anyio
from psycopg import AsyncConnection, Notify, sql
from psycopg.abc import Params

from ._connector import Configure, Conninfo
from ._driver import tuple_cursor
from ._errors import DatabaseUnavailable, Failure, PoolClosed, classify
from ._events import OnEvent
from ._ops import InDoubt, Query
from ._pool import ResilientPool
from ._retry import Backoff, RetryPolicy
from ._stats import PoolStats

__all__ = ["Reconnected", "ResilientConnection"]

logger = logging.getLogger("aiopg_resilient.connection")

T = TypeVar("T")


@dataclass(frozen=True)
class Reconnected:
    """Yielded by `ResilientConnection.listen` after its connection was re-established.

    Notifications sent while the connection was down were missed: resync your state (for
    example re-read the jobs table) before relying on notifications again.
    """

    channels: tuple[str, ...]
    downtime: float
    """Seconds between losing the connection and listening again."""
    cause: str
    """The error that broke the connection (class and message)."""


Reconnected.__module__ = "aiopg_resilient"


class ResilientConnection:
    """One self-healing connection, with the read and write guarantees of `ResilientPool`.

    For scripts, workers and LISTEN/NOTIFY consumers::

        async with ResilientConnection(dsn) as db:
            await db.execute("INSERT ...")
            async for item in db.listen("jobs"):
                if isinstance(item, Reconnected):
                    ...  # notifications may have been missed: resync
                else:
                    ...  # item is a psycopg Notify

    Queries run on one connection (a pool of size one, with its heartbeat); `listen`
    keeps its own connection, so the consumer can query while iterating. Session state
    (``SET``, temporary tables, prepared statements, advisory locks, ``LISTEN``) does not
    survive a reconnect: put what every connection needs in *configure*, which runs on
    every new connection.
    """

    def __init__(
        self,
        conninfo: Conninfo = "",
        *,
        retry: RetryPolicy | None = None,
        heartbeat_interval: float | None = 15.0,
        heartbeat_timeout: float = 5.0,
        max_lifetime: float | None = None,
        in_doubt: InDoubt = "resolve",
        configure: Configure | None = None,
        connect_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
        on_event: OnEvent | None = None,
    ) -> None:
        self._pool = ResilientPool(
            conninfo,
            min_size=1,
            max_size=1,
            retry=retry,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            max_lifetime=max_lifetime,
            max_idle=None,
            in_doubt=in_doubt,
            configure=configure,
            connect_kwargs=connect_kwargs,
            name=name,
            on_event=on_event,
        )
        self._pool._refuse_reentry = True
        self._closing = False
        self._listeners: set[AsyncConnection[Any]] = set()

    def __repr__(self) -> str:
        return repr(self._pool).replace("ResilientPool", type(self).__name__, 1)

    @property
    def stats(self) -> PoolStats:
        """Counters of the underlying connection (see `PoolStats`)."""
        return self._pool.stats

    async def open(self) -> None:
        """Connect; a configuration error raises here at once."""
        await self._pool.open()

    async def close(self) -> None:
        """Close the connection, and end any running `listen`; idempotent."""
        self._closing = True
        for conn in list(self._listeners):
            await conn.close()
        await self._pool.close()

    async def __aenter__(self) -> ResilientConnection:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def fetch(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> list[Any]:
        """See `ResilientPool.fetch`."""
        return await self._pool.fetch(query, params, idempotent=idempotent)

    async def fetchone(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> Any:
        """See `ResilientPool.fetchone`."""
        return await self._pool.fetchone(query, params, idempotent=idempotent)

    async def fetchval(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> Any:
        """See `ResilientPool.fetchval`."""
        return await self._pool.fetchval(query, params, idempotent=idempotent)

    async def execute(
        self, query: Query, params: Params | None = None, *, idempotent: bool = False
    ) -> int:
        """See `ResilientPool.execute`."""
        return await self._pool.execute(query, params, idempotent=idempotent)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection[Any]]:
        """See `ResilientPool.transaction`."""
        async with self._pool.transaction() as conn:
            yield conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """See `ResilientPool.connection`."""
        async with self._pool.connection() as conn:
            yield conn

    async def run_transaction(
        self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        """See `ResilientPool.run_transaction`."""
        return await self._pool.run_transaction(fn, *args, **kwargs)

    async def listen(self, *channels: str) -> AsyncIterator[Notify | Reconnected]:
        """Notifications on *channels*, across reconnects.

        Yields psycopg `Notify` objects, and a `Reconnected` marker each time the
        listening connection had to be re-established (LISTEN is re-issued first).
        Idle, the listener pings the server every ``heartbeat_interval`` so a dead
        connection is noticed even when no notification comes. Raises
        `DatabaseUnavailable` when the server stays unreachable for ``retry.timeout``.
        """
        if not channels:
            raise ValueError("listen() needs at least one channel")
        pool = self._pool
        statements = [sql.SQL("LISTEN {}").format(sql.Identifier(ch)) for ch in channels]
        lost_at: float | None = None
        cause = ""
        while not self._closing:
            conn = await self._listener(lost_at)
            if self._closing:  # close() ran while this connection was being made
                await conn.close()
                return
            self._listeners.add(conn)
            try:
                for statement in statements:
                    await conn.execute(statement)
                if lost_at is not None:
                    yield Reconnected(tuple(channels), time.monotonic() - lost_at, cause)
                async for item in self._notifications(conn):
                    yield item
            except Exception as exc:
                if self._closing:
                    return  # close() ended the listener
                if not (conn.broken or classify(exc) is Failure.CONNECTION):
                    raise
                lost_at = time.monotonic()
                cause = f"{type(exc).__name__}: {exc}"
                pool._events.emit("lost", error=exc)  # logged by the event stream
            finally:
                self._listeners.discard(conn)
                await conn.close()

    async def _notifications(self, conn: AsyncConnection[Any]) -> AsyncIterator[Notify]:
        pool = self._pool
        interval = pool.heartbeat_interval
        while True:
            async for notify in conn.notifies(timeout=interval):
                yield notify
            # Quiet for a whole interval: make sure the connection is still there.
            with anyio.fail_after(pool.heartbeat_timeout):
                await tuple_cursor(conn).execute("SELECT 1", prepare=False)

    async def _listener(self, lost_at: float | None) -> AsyncConnection[Any]:
        """Connect the listening connection, with backoff while the server is down."""
        pool = self._pool
        started = lost_at if lost_at is not None else time.monotonic()
        deadline = started + pool.retry.budget
        backoff = Backoff(pool.retry, pool._rng)
        attempts = 0
        while True:
            attempts += 1
            if self._closing:
                raise PoolClosed("the ResilientConnection was closed")
            held = pool._server.held()
            if held is not None:
                raise held
            try:
                return await pool._connect()
            except Exception as exc:
                if pool._note_connect_failure(exc) is Failure.FATAL:
                    raise
                if time.monotonic() >= deadline:
                    raise DatabaseUnavailable(
                        f"listener could not reconnect after {attempts} attempts: {exc}",
                        attempts=attempts,
                        last_error=exc,
                    ) from exc
                await anyio.sleep(backoff.next())
