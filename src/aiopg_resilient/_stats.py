"""PoolStats: a frozen snapshot of a pool's counters."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PoolStats"]


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
