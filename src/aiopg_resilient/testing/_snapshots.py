"""What a `ChaosProxy` reports: snapshots of its connections, its counters, and selectors.

`ProxyConnection` and `ProxyStats` are frozen values, safe to keep and compare after the
proxy has moved on; `ConnectionSelector` is how a fault method picks connections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True)
class ProxyConnection:
    """A snapshot of one client session through the proxy.

    `client_port` is the client's source port; `upstream_port` is the proxy's source port
    towards the server, i.e. what the server sees as ``pg_stat_activity.client_port``.
    Times are `time.monotonic()` values.
    """

    id: int
    client_port: int
    upstream_port: int | None
    created_at: float
    last_activity: float
    bytes_up: int
    bytes_down: int
    frozen: bool
    tls: bool


@dataclass(frozen=True)
class ProxyStats:
    """Counters of a proxy since it started (or since `ChaosProxy.reset_stats`).

    `accepted`: client connections accepted; `open`: connections open now (including ones
    still connecting upstream); `peak_open`: the most that were open at once.
    """

    accepted: int
    open: int
    peak_open: int


ConnectionSelector: TypeAlias = Callable[[ProxyConnection], bool] | Iterable[int] | None
"""Selects connections for a fault: all (None), by id, or by a predicate on a snapshot."""


ProxyConnection.__module__ = "aiopg_resilient.testing"
ProxyStats.__module__ = "aiopg_resilient.testing"
