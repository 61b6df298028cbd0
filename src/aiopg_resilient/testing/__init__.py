"""Test helpers: a throwaway PostgreSQL server with TLS (and standbys), a fault-injecting proxy.

Names are imported on first use, so importing this package (as the pytest plugin does)
needs none of the optional test dependencies (trustme) until a server is actually used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .._retry import fast_retries

if TYPE_CHECKING:
    from ._errors import ServerControlUnavailable, ServerUnavailable
    from ._pgbouncer import PgBouncer
    from ._proxy import ChaosProxy
    from ._replica import StandbyServer
    from ._server import PostgresServer
    from ._snapshots import ProxyConnection, ProxyStats
    from ._switchover import switchover
    from ._trigger import Trigger

__all__ = [
    "ChaosProxy",
    "PgBouncer",
    "PostgresServer",
    "ProxyConnection",
    "ProxyStats",
    "ServerControlUnavailable",
    "ServerUnavailable",
    "StandbyServer",
    "Trigger",
    "fast_retries",
    "switchover",
]

_WHERE = {
    "ChaosProxy": "._proxy",
    "PgBouncer": "._pgbouncer",
    "ProxyConnection": "._snapshots",
    "ProxyStats": "._snapshots",
    "Trigger": "._trigger",
    "PostgresServer": "._server",
    "ServerControlUnavailable": "._errors",
    "ServerUnavailable": "._errors",
    "StandbyServer": "._replica",
    "switchover": "._switchover",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
