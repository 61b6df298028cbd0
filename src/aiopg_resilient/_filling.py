"""Filling the pool: the first connection at open, and the background task that opens
connections while they are needed (one probe at a time while the server is down, up to
``max_connecting`` at once when it is up)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio

from ._errors import Failure, classify
from ._slots import fail_waiters, new_slot, put
from ._source import Slot

if TYPE_CHECKING:
    from ._pool import ResilientPool

__all__ = ["fill", "first_connection", "need", "wake"]

logger = logging.getLogger("aiopg_resilient.pool")


async def first_connection(pool: ResilientPool) -> Slot | None:
    """The connection open() makes itself: a configuration error raises here."""
    pool._connecting += 1
    try:
        conn = await pool._connect()
    except Exception as exc:
        if pool._note_connect_failure(exc) is Failure.FATAL:
            pool._closed = True
            raise
        logger.warning(
            "pool %r could not connect to %s yet (%s); retrying in the background",
            pool.name,
            pool._target,
            exc,
        )
        return None
    except BaseException:
        pool._closed = True
        raise
    finally:
        pool._connecting -= 1
    return new_slot(pool, conn)


def wake(pool: ResilientPool) -> None:
    """Start the filling task if connections are needed and none is running."""
    if pool._closed or not pool._opened:
        return
    held = pool._server.held()
    if held is not None:
        # A configuration error holds connecting off: callers that no live
        # connection can serve hear it at once.
        if not pool._slots:
            fail_waiters(pool, held)
        return
    task = pool._connector_task
    if (task is None or task.done()) and need(pool) > 0:
        pool._connector_task = pool._spawn(fill(pool))


def need(pool: ResilientPool) -> int:
    """How many connections to open now."""
    total = len(pool._slots) + pool._connecting
    for_waiters = min(len(pool._waiters) - pool._connecting, pool.max_size - total)
    return max(pool.min_size - total, for_waiters, 0)


async def fill(pool: ResilientPool) -> None:
    """Open connections while they are needed: one probe at a time while the server
    is down (jittered backoff, shared by every waiter), up to ``max_connecting`` in
    parallel once it is up."""
    while not pool._closed:
        count = need(pool)
        if count <= 0:
            return
        pause = pool._server.retry_at - time.monotonic()
        if pause > 0:
            await anyio.sleep(pause)
            continue
        # One probe at a time while the server is down, or may be: no live connection
        # (all were just lost to a restart, or none was made yet).
        probing = pool._server.down or pool._server.suspect or not pool._slots
        batch = 1 if probing else min(count, pool.max_connecting)
        failures: list[BaseException] = []
        if batch == 1:
            await _attempt(pool, failures)
        else:
            async with anyio.create_task_group() as tg:
                for _ in range(batch):
                    tg.start_soon(_attempt, pool, failures)
        if not failures:
            continue
        exc = failures[-1]
        if classify(exc) is Failure.FATAL:
            # Waiters no live connection can serve hear it now; new attempts wait for
            # the hold (ServerState).
            if not pool._slots:
                fail_waiters(pool, exc)
            return
        delay = pool._connector.delay(exc, pool._server.next_delay(pool.retry), pool._rng)
        pool._server.retry_at = time.monotonic() + delay
        logger.debug("pool %r retrying connect in %.3fs", pool.name, delay)


async def _attempt(pool: ResilientPool, failures: list[BaseException]) -> None:
    pool._connecting += 1
    try:
        conn = await pool._connect()
    except Exception as exc:
        pool._note_connect_failure(exc)  # an event; the log line reads it
        failures.append(exc)
        return
    finally:
        pool._connecting -= 1
    if pool._server.reachable():
        pool._events.emit("up")
    if pool._closed:
        await conn.close()
        return
    put(pool, new_slot(pool, conn))
