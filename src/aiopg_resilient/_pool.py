"""ResilientPool: acquire/release, single-flight reconnects, heartbeats, replayed reads."""

from __future__ import annotations

import asyncio
import logging
import random
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

import anyio
from psycopg import AsyncConnection, Notify
from psycopg.abc import Params

from ._blocks import Blocks
from ._connector import PROBE_INTERVAL, Configure, Connector, Conninfo
from ._dialer import Dialer
from ._driver import DriverConnection
from ._errors import Failure, PoolClosed, PoolTimeout
from ._events import EventStream, OnEvent
from ._filling import first_connection, wake
from ._heartbeat import maintain, ping_idle
from ._listen import Listeners, Reconnected
from ._look import Looker
from ._multiplex_switch import attach
from ._ops import InDoubt
from ._retry import RetryPolicy
from ._server_state import ServerState
from ._settings import validate as _validate
from ._slots import (
    acquire,
    close_slot,
    discard,
    fail_waiters,
    lost,
    put,
    release,
    side_query,
    take_idle,
)
from ._source import Slot
from ._statement import Query
from ._stats import PoolStats, snapshot

__all__ = ["ResilientPool"]

logger = logging.getLogger("aiopg_resilient.pool")

T = TypeVar("T")


class ResilientPool:
    """A pool of psycopg `AsyncConnection` that hides transient failures from reads.

    Open it with ``async with ResilientPool(dsn) as pool`` or ``await pool.open()`` /
    ``await pool.close()``. Reads (`fetch`, `fetchone`, `fetchval`) are replayed on a
    fresh connection after a connection failure until ``retry.timeout`` is spent, then
    raise `DatabaseUnavailable`. Writes through `execute` are never replayed unless the
    caller vouches they are idempotent or the layer proved they were not applied. A
    background heartbeat pings idle connections; a connection found dead makes the pool
    check the others at once. While the server is down, reconnects are single-flight
    with jittered backoff, and every waiter shares their outcome.

    All parameters are keyword-only except *conninfo*; sizes and timeouts are validated
    here, but nothing connects before `open`. *configure* runs on every new connection;
    *reset* on every connection that comes back, before the next borrower (a failing
    reset discards the connection). Whatever a borrower set on the connection object
    (row factory, isolation level...) and the session settings the server reports
    (``default_transaction_read_only``, ``TimeZone``, ``search_path``...) are put back to
    what *configure* left without it; other session state (temporary tables, advisory
    locks, other ``SET``) is *reset*'s job.
    """

    def __init__(
        self,
        conninfo: Conninfo = "",
        *,
        min_size: int = 1,
        max_size: int = 10,
        retry: RetryPolicy | None = None,
        heartbeat_interval: float | None = 15.0,
        heartbeat_timeout: float = 5.0,
        acquire_timeout: float = 30.0,
        max_lifetime: float | None = 3600.0,
        max_idle: float | None = 600.0,
        in_doubt: InDoubt = "resolve",
        configure: Configure | None = None,
        reset: Configure | None = None,
        connect_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
        max_connecting: int = 2,
        probe_interval: float = PROBE_INTERVAL,
        on_event: OnEvent | None = None,
        multiplex: bool | None = None,
    ) -> None:
        _validate(
            min_size=min_size,
            max_size=max_size,
            heartbeat_interval=heartbeat_interval,
            max_lifetime=max_lifetime,
            max_idle=max_idle,
            heartbeat_timeout=heartbeat_timeout,
            acquire_timeout=acquire_timeout,
            max_connecting=max_connecting,
            probe_interval=probe_interval,
            in_doubt=in_doubt,
        )
        kwargs = dict(connect_kwargs or {})
        self._block_autocommit = bool(kwargs.pop("autocommit", False))
        self.name = name or "aiopg_resilient"
        self._connector = Connector(
            conninfo,
            kwargs,
            application_name=self.name,
            configure=configure,
            probe_interval=probe_interval,
            setup_timeout=2 * heartbeat_timeout,
        )
        self.max_connecting = max_connecting
        self.min_size = min_size
        self.max_size = max_size
        self.retry = retry or RetryPolicy()
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.acquire_timeout = acquire_timeout
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.in_doubt: InDoubt = in_doubt
        self.reset = reset

        self._opened = False
        self._closed = False
        self._slots: set[Slot] = set()
        self._idle: deque[Slot] = deque()
        # Callers waiting for a connection, first come first served. A plain future per
        # waiter (and a loop timer for its deadline) costs a fraction of an anyio Event
        # plus a cancel scope, on the path every caller takes when the pool is busy.
        self._waiters: deque[asyncio.Future[Slot]] = deque()
        self._proxies: set[asyncio.Future[Slot]] = set()  # those of multiplexer drivers
        self._connecting = 0
        self._rng = random.Random()
        self._server = ServerState(self._rng)
        self._tasks: set[asyncio.Task[None]] = set()
        self._connector_task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._user_heartbeat = False
        self._events = EventStream(self.name, on_event, lambda: self._target)
        self._dialer = Dialer(self.name, self._connector, self._server, self._events)
        self._listeners = Listeners(
            self._dialer, self.retry, self._rng, heartbeat_interval, heartbeat_timeout
        )
        self._ops = Blocks(
            self,
            retry=self.retry,
            in_doubt=in_doubt,
            heartbeat_timeout=heartbeat_timeout,
            rng=self._rng,
            events=self._events,
        )
        self._ops._block_autocommit = self._block_autocommit
        self._ops.looker = self._looker = Looker(self._connector.connect_to, heartbeat_timeout)
        self._ops.multiplexer = self._multiplexer = attach(self, multiplex)

    @property
    def _target(self) -> str:
        return self._connector.target

    @property
    def closed(self) -> bool:
        """True until `open`, and after `close` (as psycopg_pool's ``closed``)."""
        return self._closed or not self._opened

    @property
    def configure(self) -> Configure | None:
        """Run on every new connection (a `ConfigureError` when it fails)."""
        return self._connector.configure

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._opened else "new"
        return (
            f"<{type(self).__name__} {self.name!r} {self._target} {state} "
            f"size={len(self._slots)} idle={len(self._idle)}>"
        )

    # -- operations (see _ops and _blocks) -------------------------------------------

    async def fetch(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> list[Any]:
        return await self._ops.fetch(query, params, idempotent=idempotent)

    async def fetchone(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> Any:
        return await self._ops.fetchone(query, params, idempotent=idempotent)

    async def fetchval(
        self, query: Query, params: Params | None = None, *, idempotent: bool = True
    ) -> Any:
        return await self._ops.fetchval(query, params, idempotent=idempotent)

    async def execute(
        self, query: Query, params: Params | None = None, *, idempotent: bool = False
    ) -> int:
        return await self._ops.execute(query, params, idempotent=idempotent)

    def connection(self) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        return self._ops.connection()

    def transaction(self) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        return self._ops.transaction()

    async def run_transaction(
        self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        return await self._ops.run_transaction(fn, *args, **kwargs)

    def listen(self, *channels: str) -> AsyncIterator[Notify | Reconnected]:
        """Notifications on *channels*, across reconnects, on a connection of its own.

        Yields psycopg `Notify` objects, and a `Reconnected` marker each time the
        listening connection had to be re-established (LISTEN is re-issued first;
        notifications sent meanwhile were missed: resync). The listening connection is
        outside the pool (not counted in ``max_size``). Idle, it pings the server every
        ``heartbeat_interval`` so a dead connection is noticed even when no
        notification comes. Raises `DatabaseUnavailable` when the server stays
        unreachable for ``retry.timeout``; `close()` ends it.
        """
        if not channels:
            raise ValueError("listen() needs at least one channel")
        if not self._opened or self._closed:
            raise PoolClosed(f"pool {self.name!r} is {'closed' if self._closed else 'not open'}")
        return self._listeners.listen(*channels)

    # -- lifecycle -------------------------------------------------------------------

    async def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Connect the first connection and start the background work.

        A configuration error (wrong password, unknown database, SSL mismatch, a failing
        ``configure``) raises here at once. An unreachable server does not: the pool
        keeps probing it in the background and callers wait for it within their retry
        budget. With *wait*, return once ``min_size`` connections are up, or raise
        `PoolTimeout` after *timeout* seconds, or the configuration error, within
        *timeout* (the pool stays open: close it).
        """
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed; create a new one")
        if not self._opened:
            self._opened = True
            logger.info("pool %r opening to %s", self.name, self._target)
            if self.min_size > 0 and not wait:
                slot = await first_connection(self)
                if slot is not None:
                    self._put(slot)
            self._wake_connector()
            if not self._user_heartbeat:
                self._maintainer = self._spawn(maintain(weakref.ref(self)))
        if wait:
            await self.wait(timeout)

    async def wait(self, timeout: float = 30.0) -> None:
        """Wait until ``min_size`` connections are up; `PoolTimeout` after *timeout*, or
        the configuration error that stops the pool from connecting."""
        if not self._opened or self._closed:
            raise PoolClosed(f"pool {self.name!r} is {'closed' if self._closed else 'not open'}")
        with anyio.move_on_after(timeout):
            while len(self._slots) < self.min_size:
                held = self._server.held()
                if held is not None:
                    raise held
                self._wake_connector()
                await anyio.sleep(0.01)
            return
        raise PoolTimeout(
            f"pool {self.name!r}: {len(self._slots)} of min_size={self.min_size} "
            f"connections up after {timeout}s (last error: {self._server.last_error})"
        )

    async def close(self) -> None:
        """Close every connection and stop the background work; idempotent.

        Waiters get `PoolClosed`; connections in use are closed when they are returned.
        """
        if self._closed and not self._tasks:
            return
        self._closed = True
        # What needs no waiting first, so a cancelled close() still closes it all.
        if self._multiplexer is not None:
            self._multiplexer.close()
        fail_waiters(self, PoolClosed(f"pool {self.name!r} was closed"))
        while self._idle:
            await self._close_slot(self._idle.pop())  # never suspends
        await self._listeners.close()
        await self._looker.close()
        tasks = list(self._tasks) + self._events.pending()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # the caller's own cancellation propagates
        logger.info("pool %r closed", self.name)

    async def __aenter__(self) -> ResilientPool:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- stats and events ------------------------------------------------------------

    @property
    def stats(self) -> PoolStats:
        """A frozen snapshot of the pool's counts and counters."""
        return snapshot(self)

    def subscribe(self, fn: OnEvent, *, per_operation: bool = False) -> Callable[[], None]:
        """Call *fn* with every later `PoolEvent`, as ``on_event`` (which may be a
        coroutine function); returns the function that unsubscribes it. With
        *per_operation*, *fn* also gets ``acquire`` and ``release`` for every borrowed
        connection, which the pool makes only while such a reader is subscribed."""
        return self._events.subscribe(fn, per_operation=per_operation)

    # -- connecting ------------------------------------------------------------------

    async def _connect(self) -> DriverConnection:
        return await self._dialer.connect()

    def _note_connect_failure(self, exc: BaseException) -> Failure:
        return self._dialer.failed(exc)

    def _wake_connector(self) -> None:
        wake(self)

    # -- the connection source (see _slots) -----------------------------------------

    def _put(self, slot: Slot) -> None:
        put(self, slot)

    async def _take_idle(self) -> Slot | None:
        return await take_idle(self)

    async def _acquire(self, deadline: float, since: float | None = None) -> Slot:
        return await acquire(self, deadline, since)

    async def _release(self, slot: Slot) -> None:
        await release(self, slot)

    async def _discard(self, slot: Slot) -> None:
        await discard(self, slot)

    async def _lost(self, slot: Slot, exc: BaseException | None) -> None:
        await lost(self, slot, exc)

    async def _close_slot(self, slot: Slot) -> None:
        await close_slot(self, slot)

    async def _side_query(self, query: str, params: dict[str, Any]) -> Any:
        return await side_query(self, query, params)

    # -- heartbeat -------------------------------------------------------------------

    def _start_sweep(self) -> None:
        if self._closed or (self._sweeper is not None and not self._sweeper.done()):
            return
        self._sweeper = self._spawn(self.check())

    async def check(self) -> None:
        """Ping every idle connection now (``SELECT 1`` within ``heartbeat_timeout``)."""
        await ping_idle(self, lambda slot: True)

    async def run_heartbeat(self) -> None:
        """Run the heartbeat and maintenance in the caller's task, until cancelled.

        For applications that want to own the background work in their own task group:
        the pool's internal heartbeat task stops while this runs.
        """
        self._user_heartbeat = True
        if self._maintainer is not None:
            self._maintainer.cancel()
        await maintain(weakref.ref(self))


_OPERATIONS = "fetch fetchone fetchval execute connection transaction run_transaction"
for _name in _OPERATIONS.split():
    getattr(ResilientPool, _name).__doc__ = getattr(Blocks, _name).__doc__
