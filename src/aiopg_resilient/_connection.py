"""ResilientConnection: one self-healing connection, and listen() that survives reconnects."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

from psycopg import AsyncConnection, Notify
from psycopg.abc import Params

from ._connector import Configure, Conninfo
from ._events import OnEvent
from ._listen import Reconnected
from ._ops import InDoubt
from ._pool import ResilientPool
from ._retry import RetryPolicy
from ._statement import Query
from ._stats import PoolStats

__all__ = ["Reconnected", "ResilientConnection"]

logger = logging.getLogger("aiopg_resilient.connection")

T = TypeVar("T")


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

    def listen(self, *channels: str) -> AsyncIterator[Notify | Reconnected]:
        """Notifications on *channels*, across reconnects.

        Yields psycopg `Notify` objects, and a `Reconnected` marker each time the
        listening connection had to be re-established (LISTEN is re-issued first).
        Idle, the listener pings the server every ``heartbeat_interval`` so a dead
        connection is noticed even when no notification comes. Raises
        `DatabaseUnavailable` when the server stays unreachable for ``retry.timeout``.
        """
        return self._pool.listen(*channels)
