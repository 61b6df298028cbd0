"""The one way the pool makes a connection: connect, tell the event stream, and keep
the server's state (reachable or not, its last error, the incarnation it is) current."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable

import anyio

from ._connector import Connector
from ._driver import DriverConnection
from ._errors import DatabaseUnavailable, Failure, PoolClosed
from ._events import EventStream
from ._retry import RetryPolicy
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
        # While the server is down, connections of its own are made one at a time.
        self._single = anyio.Lock()

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
        if kind is Failure.WRONG_ROLE and self.server.wants_primary:
            # No server in the conninfo takes writes (now): ask for any again, so reads
            # keep working; the next write that reaches a standby asks again.
            self.server.wants_primary = False
            logger.warning(
                "pool %r: no read-write server answered; new connections take any server",
                self.name,
            )
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
        """A connection of its own (a listener's), retried while the server is down:
        one attempt at a time across every caller of this while it is down or may be
        (a connection was just lost), on the pool's backoff
        schedule (`ServerState.retry_at`); `DatabaseUnavailable` once ``retry.budget``
        from *started* is spent, the configuration error at once."""
        deadline = started + retry.budget
        attempts = 0
        while True:
            if closing():
                raise PoolClosed(f"pool {self.name!r} was closed")
            held = self.server.held()
            if held is not None:
                raise held
            pause = self.server.retry_at - time.monotonic()
            if pause > 0:
                await anyio.sleep(min(pause, max(deadline - time.monotonic(), 0.0)) + 0.001)
                if time.monotonic() < deadline:
                    continue
            single = self.server.down or self.server.suspect  # down, or may be
            async with self._single if single else _NOTHING:
                if self.server.retry_at > time.monotonic() and time.monotonic() < deadline:
                    continue  # another attempt failed while this one waited its turn
                attempts += 1
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
                    delay = self.connector.delay(exc, self.server.next_delay(retry), rng)
                    self.server.retry_at = time.monotonic() + delay
                    continue
            if self.server.reachable():
                self.events.emit("up")
            return conn


_NOTHING = contextlib.nullcontext()
