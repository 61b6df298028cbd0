"""The one way the pool makes a connection: connect, tell the event stream, and keep
the server's state (reachable or not, its last error, the incarnation it is) current."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import anyio

from ._connector import Connector
from ._driver import DriverConnection
from ._errors import DatabaseUnavailable, Failure, PoolClosed
from ._events import EventStream
from ._retry import Backoff, RetryPolicy
from ._server_state import ServerState

__all__ = ["Dialer"]

logger = logging.getLogger("aiopg_resilient.pool")


class Dialer:
    """Connects through a `Connector`, noting each outcome in the `ServerState` and as
    an event."""

    def __init__(
        self,
        name: str,
        connector: Connector,
        server: ServerState,
        events: EventStream,
    ) -> None:
        self.name = name
        self.connector = connector
        self.server = server
        self.events = events

    async def connect(self) -> DriverConnection:
        """One connection attempt (no gate, no note of a failure: see `failed`)."""
        started = time.monotonic()
        conn = await self.connector.connect(primary=self.server.wants_primary)
        self.events.emit("connect", duration=time.monotonic() - started)
        if self.server.learnt(conn.identity):
            logger.info(
                "pool %r: the server at %s is a new incarnation since the last connect "
                "(restarted, crashed, or another cluster behind the address)",
                self.name,
                self.connector.target,
            )
        return conn

    def failed(self, exc: BaseException) -> Failure:
        """Note a failed connect: an event, the server's state; returns its kind."""
        self.events.emit("connect_failed", error=exc)
        was_down = self.server.down
        kind = self.server.failed(exc)
        if self.server.down and not was_down:
            self.events.emit("down", error=exc)
        return kind

    async def dedicated(
        self,
        retry: RetryPolicy,
        rng: random.Random,
        started: float,
        closing: Callable[[], bool],
    ) -> DriverConnection:
        """A connection of its own (a listener's), retried with backoff while the server
        is down; `DatabaseUnavailable` once ``retry.budget`` from *started* is spent, the
        configuration error at once."""
        deadline = started + retry.budget
        backoff = Backoff(retry, rng)
        attempts = 0
        while True:
            attempts += 1
            if closing():
                raise PoolClosed(f"pool {self.name!r} was closed")
            held = self.server.held()
            if held is not None:
                raise held
            try:
                conn = await self.connect()
            except Exception as exc:
                if self.failed(exc) is Failure.FATAL:
                    raise
                if time.monotonic() >= deadline:
                    raise DatabaseUnavailable(
                        f"listener could not reconnect after {attempts} attempts: {exc}",
                        attempts=attempts,
                        last_error=exc,
                    ) from exc
                await anyio.sleep(backoff.next())
            else:
                if self.server.reachable():
                    self.events.emit("up")
                return conn
