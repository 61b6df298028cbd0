"""A pool's connections: handing them out, taking them back, dropping dead ones. This is
the `ConnectionSource` the operations run over (the pool's ``_acquire``, ``_release``,
``_discard``, ``_lost`` and ``_side_query`` call these)."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import deque
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from psycopg.pq import TransactionStatus

from ._attempts import Attempts
from ._blocks import held_here
from ._driver import DriverConnection, tuple_cursor
from ._errors import DatabaseUnavailable, Failure, PoolClosed, PoolTimeout, classify
from ._failures import failure_of
from ._liveness import looks_alive
from ._role import RoleChanged, wrong_server
from ._source import Slot

if TYPE_CHECKING:
    from ._pool import ResilientPool

__all__ = [
    "acquire",
    "close_slot",
    "discard",
    "fail_waiters",
    "gave_up",
    "lost",
    "new_slot",
    "put",
    "release",
    "schedule_check",
    "side_query",
    "take_idle",
]

logger = logging.getLogger("aiopg_resilient.pool")


def new_slot(pool: ResilientPool, conn: DriverConnection) -> Slot:
    """Count a new connection in; it is not idle yet (see `put`)."""
    now = time.monotonic()
    expires = None
    if pool.max_lifetime is not None:
        # Up to 10% earlier, so connections made together do not expire together.
        expires = now + pool.max_lifetime * pool._rng.uniform(0.9, 1.0)
    slot = Slot(conn=conn, created=now, expires=expires, last_used=now)
    schedule_check(pool, slot, now)
    pool._slots.add(slot)
    return slot


def schedule_check(pool: ResilientPool, slot: Slot, now: float) -> None:
    if pool.heartbeat_interval is not None:
        slot.next_check = now + pool.heartbeat_interval * pool._rng.uniform(0.8, 1.0)


def fail_waiters(pool: ResilientPool, exc: BaseException) -> None:
    """Fail every waiter, each with its own copy of *exc* (tracebacks stay apart)."""
    while pool._waiters:
        waiter = pool._waiters.popleft()
        if not waiter.done():
            waiter.set_exception(copy.copy(exc))


class _FoundClosed(Exception):
    """The cause of a loss found without an error (internal, for events)."""

    def __init__(self) -> None:
        super().__init__("an idle connection was found closed (by the server or a proxy)")


class _Expired(Exception):
    """A waiter's time ran out (internal)."""


def _expire(fut: asyncio.Future[Slot]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


def put(pool: ResilientPool, slot: Slot) -> None:
    """Hand a healthy connection to the first waiter, or make it idle."""
    if pool._closed:  # nothing goes back into a closed pool
        pool._slots.discard(slot)
        _close_later(slot.conn)
        return
    while pool._waiters:
        waiter = pool._waiters.popleft()
        if not waiter.done():  # skip callers that gave up
            waiter.set_result(slot)
            return
    pool._idle.append(slot)


async def take_idle(pool: ResilientPool) -> Slot | None:
    now = time.monotonic()
    while pool._idle:
        slot = pool._idle.pop()
        if (slot.expires is None or now < slot.expires) and looks_alive(slot.conn):
            drift = slot.conn.role_drift()
            if drift is None:
                return slot
            await lost(pool, slot, RoleChanged(drift))
        elif slot.expires is not None and now >= slot.expires:
            await retire(pool, slot)
        else:
            await lost(pool, slot, None)
    return None


async def acquire(pool: ResilientPool, deadline: float, since: float | None = None) -> Slot:
    """A live connection, waiting at most until *deadline* (monotonic). With *since*, a
    multiplexer's driver waits for the queued read that began waiting then: its wait is
    that read's, and it is not a caller (``stats.waiting`` counts the read instead)."""
    if not pool._opened or pool._closed:
        raise PoolClosed(f"pool {pool.name!r} is {'closed' if pool._closed else 'not open'}")
    events = pool._events
    timed = events.per_op  # acquire/release events only while a reader wants them
    started = time.monotonic() if timed else 0.0
    slot = await take_idle(pool)
    if slot is not None:
        if timed:
            events.borrowed(slot, started)
        return slot
    held = pool._server.held()
    if held is not None and not pool._slots:
        raise held  # a configuration error, and no connection to wait for
    if held_here(pool) >= pool.max_size:
        raise psycopg.ProgrammingError(
            f"this task already holds every connection of {pool.name!r} "
            f"(max_size={pool.max_size}) in a block, e.g. db.fetchval() inside "
            "db.transaction(): waiting would never end. Use the connection the block "
            "gave you (await conn.execute(...))."
        )
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Slot] = loop.create_future()
    failures_before = pool._events.counters["connect_failures"]
    pool._waiters.append(waiter)
    if since is not None:
        pool._proxies.add(waiter)
    pool._wake_connector()
    now = time.monotonic()
    down = pool._server.down
    patience = pool.acquire_timeout - (0.0 if since is None else now - since)
    wait = deadline - now if down else min(deadline - now, patience)
    timer = loop.call_later(max(wait, 0.0), _expire, waiter)
    try:
        slot = await waiter
        events.emit("acquire_wait", duration=time.monotonic() - now)
        if timed:
            events.borrowed(slot, started)
        return slot
    except BaseException as exc:
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            put(pool, waiter.result())  # handed over just as we gave up
        else:
            with suppress(ValueError):
                pool._waiters.remove(waiter)
        if not isinstance(exc, _Expired):
            raise
        attempts = pool._events.counters["connect_failures"] - failures_before
        # A driver's wait is counted per read it failed (_multiplex).
        error = gave_up(pool, wait, attempts, count=since is None)
        raise error from error.__cause__
    finally:
        timer.cancel()
        pool._proxies.discard(waiter)


def gave_up(pool: ResilientPool, waited: float, attempts: int, *, count: bool) -> Exception:
    """Why a caller that waited *waited* seconds for a connection got none: the server is
    unreachable (`DatabaseUnavailable`), or every connection stayed busy (``PoolTimeout``,
    an ``acquire_timeout`` event when *count*)."""
    last_error = pool._server.last_error
    error: Exception
    if pool._server.down or (last_error is not None and len(pool._slots) == 0):
        error = DatabaseUnavailable(
            f"database {pool._target} unreachable: {last_error}",
            attempts=max(1, attempts),
            last_error=last_error,
        )
        error.__cause__ = last_error
    else:
        if count:
            pool._events.emit("acquire_timeout", duration=waited)
        error = PoolTimeout(
            f"no connection free in pool {pool.name!r} within {waited:.3f}s "
            f"(size={len(pool._slots)}, max_size={pool.max_size}, "
            f"waiting={pool.stats.waiting})"
        )
        error.__cause__ = pool._server.held()
    error.__suppress_context__ = True
    return error


async def release(pool: ResilientPool, slot: Slot) -> None:
    """Return a connection after use: idle if clean, else discarded."""
    if pool._events.per_op:
        pool._events.returned(slot)
    conn = slot.conn
    if (
        pool._closed
        or conn.closed
        or conn.broken
        or conn.pgconn.transaction_status != TransactionStatus.IDLE
    ):
        await discard(pool, slot)
        return
    now = time.monotonic()
    if slot.expires is not None and now >= slot.expires:
        await retire(pool, slot)
        return
    conn.owner = None
    try:
        if not conn.autocommit:
            await conn.set_autocommit(True)  # local only: the connection is idle
        await conn.restore_settings()  # a round trip only if a SET changed something
        if pool.reset is not None:
            await pool.reset(conn)
            if conn.pgconn.transaction_status != TransactionStatus.IDLE:
                raise psycopg.ProgrammingError("reset() left the connection in a transaction")
    except RoleChanged as exc:  # the server stopped taking writes: drop it, check the rest
        await lost(pool, slot, exc)
        return
    except Exception as exc:
        logger.warning("pool %r: could not reset a returned connection: %s", pool.name, exc)
        await discard(pool, slot)
        return
    except BaseException:
        await discard(pool, slot)
        raise
    slot.last_used = now
    schedule_check(pool, slot, now)
    put(pool, slot)


async def side_query(pool: ResilientPool, query: str, params: dict[str, Any]) -> Any:
    """The first row of a query of the layer's own on another connection: an idle
    pooled one, else a short-lived one outside the pool's limits and its queue (an
    in-doubt resolution must not wait behind the callers of a saturated pool).
    Replayed on connection failures within the retry budget."""
    attempts = Attempts(pool.retry, pool._rng)
    while True:
        attempts.count += 1
        slot = await take_idle(pool)
        try:
            if slot is not None:
                # An idle connection may be on a silent path too: bounded like a ping.
                with anyio.fail_after(pool.heartbeat_timeout):
                    row = await _first_row(slot.conn, query, params)
                await release(pool, slot)
                return row
            conn = await pool._connect()
            try:
                with anyio.fail_after(pool.heartbeat_timeout):
                    return await _first_row(conn, query, params)
            finally:
                await conn.close()
        except TimeoutError as exc:
            if slot is not None:
                await lost(pool, slot, exc)
            await attempts.again(exc)
            continue
        except Exception as exc:
            if slot is not None:
                if await failure_of(slot.conn, exc) is None:
                    await release(pool, slot)
                    raise
                await lost(pool, slot, exc)
            elif classify(exc) is Failure.FATAL or not isinstance(exc, psycopg.OperationalError):
                raise
            await attempts.again(exc)
        except BaseException:
            if slot is not None:
                await discard(pool, slot)
            raise


async def discard(pool: ResilientPool, slot: Slot) -> None:
    """Close a connection whose state is unknown or bad, and replace it."""
    if pool._events.per_op:
        pool._events.returned(slot)
    await close_slot(pool, slot)
    pool._wake_connector()


async def close_slot(pool: ResilientPool, slot: Slot) -> None:
    # AsyncConnection.close() never suspends, so this completes even when the
    # caller is being cancelled: no connection leaks.
    pool._slots.discard(slot)
    await slot.conn.close()


async def retire(pool: ResilientPool, slot: Slot) -> None:
    logger.debug("pool %r: retiring a connection past its lifetime", pool.name)
    await discard(pool, slot)


async def lost(pool: ResilientPool, slot: Slot, exc: BaseException | None) -> None:
    """A connection was found dead: drop it, check the others, replace it."""
    if pool._events.per_op:
        pool._events.returned(slot)
    pool._events.emit("lost", error=exc or _FoundClosed())
    pool._server.suspect = True
    wrong = exc is not None and wrong_server(exc) and not pool._server.wants_primary
    if wrong:
        # A write needs a primary: drain the standby, and ask libpq for one from now on.
        pool._server.wants_primary = True
        logger.warning(
            "pool %r: a write reached a server in recovery; connections to standbys are "
            "dropped and new ones ask for a read-write session",
            pool.name,
        )
    await close_slot(pool, slot)
    await check_idle_locally(pool, standbys_too=wrong)
    if isinstance(exc, TimeoutError):
        # No local evidence (a half-open peer): ping the others now.
        pool._start_sweep()
    pool._wake_connector()


async def check_idle_locally(pool: ResilientPool, *, standbys_too: bool = False) -> None:
    """One loss warns the rest: drop idle connections whose socket says they died, or
    whose server turned read-only (and, with *standbys_too*, every one on a standby)."""
    if not pool._idle:
        return
    causes: dict[Slot, BaseException] = {}
    for slot in pool._idle:
        if not looks_alive(slot.conn):
            causes[slot] = _FoundClosed()
        elif (drift := slot.conn.role_drift()) is not None or (
            standbys_too and slot.conn.role_now()[0] == b"on"
        ):
            causes[slot] = RoleChanged(drift or "the server is a standby (in_hot_standby = on)")
    if not causes:
        return
    pool._idle = deque(s for s in pool._idle if s not in causes)
    for slot, cause in causes.items():
        pool._events.emit("lost", error=cause)
        await close_slot(pool, slot)


_closing: set[asyncio.Task[None]] = set()


def _close_later(conn: DriverConnection) -> None:
    task = asyncio.ensure_future(conn.close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def _first_row(conn: DriverConnection, query: str, params: dict[str, Any]) -> Any:
    cur = tuple_cursor(conn)
    await cur.execute(query, params, prepare=False)
    return await cur.fetchone()
