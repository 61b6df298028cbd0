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
from ._driver import tuple_cursor
from ._errors import Failure, classify
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

    async def close(self) -> None:
        """End every running listener (each returns from its loop)."""
        self._closing = True
        for conn in list(self._conns):
            await conn.close()

    async def listen(self, *channels: str) -> AsyncIterator[Notify | Reconnected]:
        if not channels:
            raise ValueError("listen() needs at least one channel")
        statements = [sql.SQL("LISTEN {}").format(sql.Identifier(ch)) for ch in channels]
        lost_at: float | None = None
        cause = ""
        while not self._closing:
            conn = await self._dialer.dedicated(
                self._retry,
                self._rng,
                lost_at if lost_at is not None else time.monotonic(),
                lambda: self._closing,
            )
            if self._closing:  # close() ran while this connection was being made
                await conn.close()
                return
            self._conns.add(conn)
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
                self._dialer.events.emit("lost", error=exc)  # logged by the event stream
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
