"""aiopg_resilient: PostgreSQL on asyncio that survives the real world.

A pool of psycopg 3 ``AsyncConnection`` with heartbeats, single-flight jittered
reconnects, reads that never see a transient failure and writes that are never doubled
or lost. See the README for the guarantees and the error table.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._connection import ResilientConnection
from ._errors import (
    CommitUnknown,
    ConfigureError,
    ConnectionLost,
    DatabaseUnavailable,
    Failure,
    PoolClosed,
    PoolTimeout,
    classify,
    is_disconnect,
)
from ._events import PoolEvent
from ._listen import Reconnected
from ._pool import ResilientPool
from ._retry import RetryPolicy, set_testing
from ._stats import PoolStats

try:
    __version__ = version("aiopg-resilient")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "CommitUnknown",
    "ConfigureError",
    "ConnectionLost",
    "DatabaseUnavailable",
    "Failure",
    "PoolClosed",
    "PoolEvent",
    "PoolStats",
    "PoolTimeout",
    "Reconnected",
    "ResilientConnection",
    "ResilientPool",
    "RetryPolicy",
    "classify",
    "is_disconnect",
    "set_testing",
]

for _name in ("ResilientPool", "ResilientConnection", "RetryPolicy", "PoolStats"):
    globals()[_name].__module__ = __name__
