"""PoolStats: a frozen snapshot of a pool's counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PoolStats", "snapshot"]


@dataclass(frozen=True)
class PoolStats:
    """A point-in-time snapshot of a `ResilientPool` (``pool.stats``).

    Counts (``size``, ``idle``, ``in_use``, ``connecting``, ``waiting``) are exact at the
    moment of the snapshot; the others are totals since the pool was created. No field
    ever holds a password: ``last_error`` is the error's class and libpq's message.
    """

    name: str
    min_size: int
    max_size: int
    size: int
    """Open connections, idle or in use."""
    idle: int
    in_use: int
    connecting: int
    """Connection attempts in flight."""
    waiting: int
    """Callers waiting for a connection."""
    down: bool
    """The last connection attempt failed and the pool is probing the server."""
    connects: int
    connect_failures: int
    connections_lost: int
    """Connections found dead (by a query, a check at checkout or a heartbeat)."""
    retries: int
    """Operations re-run after a transient failure."""
    heartbeats: int
    heartbeat_failures: int
    acquire_timeouts: int
    commits_resolved: int
    """In-doubt commits whose outcome was established through the transaction id."""
    commits_unknown: int
    last_error: str | None


def snapshot(pool: Any) -> PoolStats:
    """*pool*'s `PoolStats` now. ``waiting`` counts callers: the reads a multiplexer
    queued, and the waiters for a connection but its drivers (which wait for them)."""
    waiters = pool._waiters
    proxies = pool._proxies
    waiting = len(waiters) - (sum(1 for w in waiters if w in proxies) if proxies else 0)
    if pool._multiplexer is not None:
        waiting += pool._multiplexer.queued
    return PoolStats(
        name=pool.name,
        min_size=pool.min_size,
        max_size=pool.max_size,
        size=len(pool._slots),
        idle=len(pool._idle),
        in_use=len(pool._slots) - len(pool._idle),
        connecting=pool._connecting,
        waiting=waiting,
        down=pool._server.down,
        last_error=pool._events.last_error,
        **pool._events.counters,
    )
