"""The heartbeat: idle connections pinged, lifetimes and idle time enforced, in the
background (a task holding only a weak reference to the pool) or in the caller's task
(`ResilientPool.run_heartbeat`)."""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from ._driver import tuple_cursor
from ._source import Slot

if TYPE_CHECKING:
    from ._pool import ResilientPool

__all__ = ["maintain", "ping_idle"]

logger = logging.getLogger("aiopg_resilient.pool")


async def ping_idle(pool: ResilientPool, due: Callable[[Slot], bool]) -> None:
    """Ping the idle connections *due* says are due, in parallel; dead ones are lost."""
    slots = [s for s in pool._idle if due(s)]
    if not slots:
        return
    for slot in slots:
        pool._idle.remove(slot)
    unpinged = set(slots)
    try:
        async with anyio.create_task_group() as tg:
            for slot in slots:
                tg.start_soon(_ping, pool, slot, unpinged)
    finally:
        # Cancelled before some pings even started: those connections are as good
        # as they were, back to the pool with them.
        for slot in unpinged:
            pool._put(slot)


async def _ping(pool: ResilientPool, slot: Slot, unpinged: set[Slot]) -> None:
    unpinged.discard(slot)
    pool._events.emit("heartbeat")
    error: BaseException | None = None
    try:
        with anyio.fail_after(pool.heartbeat_timeout):
            await tuple_cursor(slot.conn).execute("SELECT 1", prepare=False)
    except Exception as exc:
        error = exc
    except BaseException:
        await pool._close_slot(slot)
        raise
    if error is None:
        await pool._release(slot)
        return
    pool._events.emit("heartbeat_failed", error=error)
    await pool._lost(slot, error)


async def _maintain_once(pool: ResilientPool) -> None:
    now = time.monotonic()
    # Expired lifetimes and idle connections above min_size.
    drop: list[Slot] = []
    size = len(pool._slots)
    for slot in pool._idle:
        if slot.expires is not None and now >= slot.expires:
            drop.append(slot)
        elif (
            pool.max_idle is not None
            and now - slot.last_used > pool.max_idle
            and size > pool.min_size
        ):
            drop.append(slot)
            size -= 1
    if drop:
        pool._idle = deque(s for s in pool._idle if s not in drop)
        for slot in drop:
            await pool._close_slot(slot)
    if pool.heartbeat_interval is not None:
        await ping_idle(pool, lambda s: now >= s.next_check)
    pool._wake_connector()


async def maintain(ref: weakref.ref[ResilientPool]) -> None:
    """The pool's background loop; holds only a weak reference to the pool."""
    while True:
        pool = ref()
        if pool is None or pool._closed:
            return
        tick = 1.0
        if pool.heartbeat_interval is not None:
            tick = min(tick, pool.heartbeat_interval / 4)
        try:
            await _maintain_once(pool)
        except Exception:
            logger.exception("pool %r: heartbeat failed; carrying on", pool.name)
        del pool
        await anyio.sleep(tick)
