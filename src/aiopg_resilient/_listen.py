"""LISTEN that survives reconnects: a connection of its own per `listen()`, LISTEN
re-issued after each reconnect, a `Reconnected` marker so the consumer can resync."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from psycopg import AsyncConnection, Notify, sql

from ._dialer import Dialer
from ._driver import DriverConnection, tuple_cursor
from ._errors import Failure, PoolClosed, classify
from ._retry import RetryPolicy

__all__ = ["Listeners", "Reconnected"]


@dataclass(frozen=True)
class Reconnected:
    """Yielded by ``listen()`` after its connection was re-established.

    Notifications sent while the connection was down were missed: resync your state (for
    example re-read the jobs table) before relying on notifications again.
    """

    channels: tuple[str, ...]
    downtime: float
    """Seconds between losing the connection and listening again."""
    cause: str
    """The error that broke the connection (class and message)."""


Reconnected.__module__ = "aiopg_resilient"


class Listeners:
    """The running ``listen()`` iterators of one pool, so closing the pool ends them."""

    def __init__(
        self,
        dialer: Dialer,
        retry: RetryPolicy,
        rng: random.Random,
        heartbeat_interval: float | None,
        heartbeat_timeout: float,
    ) -> None:
        self._dialer = dialer
        self._retry = retry
        self._rng = rng
        self._interval = heartbeat_interval
        self._timeout = heartbeat_timeout
        self._closing = False
        self._conns: set[AsyncConnection[Any]] = set()
        self._dialing: set[anyio.CancelScope] = set()

    async def close(self) -> None:
        """End every running listener (each returns from its loop), including one that
        is connecting or waiting to reconnect."""
        self._closing = True
        for scope in list(self._dialing):
            scope.cancel()
        for conn in list(self._conns):
            await conn.close()

    async def _dial(self, started: float) -> DriverConnection | None:
        """The listener's connection, or None if close() ran meanwhile."""
        with anyio.CancelScope() as scope:
            self._dialing.add(scope)
            try:
                conn = await self._dialer.dedicated(
                    self._retry, self._rng, started, lambda: self._closing
                )
            finally:
                self._dialing.discard(scope)
        if scope.cancelled_caught or self._closing:
            if not scope.cancelled_caught:
                await conn.close()  # close() ran while this connection was being made
            return None
        return conn

    async def listen(self, *channels: str) -> AsyncIterator[Notify | Reconnected]:
        if not channels:
            raise ValueError("listen() needs at least one channel")
        if self._closing:
            raise PoolClosed("listen() on a closed pool")
        statements = [sql.SQL("LISTEN {}").format(sql.Identifier(ch)) for ch in channels]
        lost_at: float | None = None
        cause = ""
        while not self._closing:
            conn = await self._dial(lost_at if lost_at is not None else time.monotonic())
            if conn is None:
                return
            self._conns.add(conn)
            try:
                # LISTEN must take effect now, whatever configure() did to autocommit,
                # and a silent path must not hold it forever.
                await conn.set_autocommit(True)
                with anyio.fail_after(self._timeout):
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
                self._dialer.events.emit("lost", error=exc)  # logged by the event stream
                self._dialer.server.suspect = True  # the next connect is a single probe
            finally:
                self._conns.discard(conn)
                await conn.close()

    async def _notifications(self, conn: AsyncConnection[Any]) -> AsyncIterator[Notify]:
        while True:
            async for notify in conn.notifies(timeout=self._interval):
                yield notify
            # Quiet for a whole interval: make sure the connection is still there.
            with anyio.fail_after(self._timeout):
                await tuple_cursor(conn).execute("SELECT 1", prepare=False)
