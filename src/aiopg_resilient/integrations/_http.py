"""What both framework integrations share, free of any framework: the HTTP answer for
each error of the layer, and the readiness of a pool.

| error | status | why |
|---|---|---|
| `DatabaseUnavailable` | 503, ``Retry-After`` | the database stayed unreachable for the budget |
| `PoolTimeout` | 503, ``Retry-After`` | every connection stayed busy: try again soon |
| `ConnectionLost` | 503, ``Retry-After`` | lost inside something the layer cannot replay |
| `PoolClosed` | 503, ``Retry-After`` | the service is shutting down: another replica can answer |
| `CommitUnknown` | 500 | the write may or may not have been applied: say so, with its id |

Bodies are JSON, never a traceback: ``{"error": ..., "detail": ..., "retry": ...}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .._errors import (
    CommitUnknown,
    ConnectionLost,
    DatabaseUnavailable,
    PoolClosed,
    PoolTimeout,
)
from .._pool import ResilientPool

__all__ = ["ERRORS", "HttpError", "http_error", "readiness"]

logger = logging.getLogger("aiopg_resilient.integrations")

RETRY_AFTER = 1
"""Seconds, in the ``Retry-After`` header of a 503."""


@dataclass(frozen=True)
class HttpError:
    """The HTTP answer for an error of the layer."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


ERRORS: tuple[type[Exception], ...] = (
    CommitUnknown,
    DatabaseUnavailable,
    PoolTimeout,
    ConnectionLost,
    PoolClosed,
)
"""The errors the integrations answer (CommitUnknown first: it subclasses none of the
others, but is checked before them all the same)."""


_UNAVAILABLE: tuple[tuple[type[Exception], str], ...] = (
    (DatabaseUnavailable, "database_unavailable"),
    (PoolTimeout, "database_busy"),
    (ConnectionLost, "connection_lost"),
    (PoolClosed, "shutting_down"),
)


def http_error(exc: BaseException) -> HttpError | None:
    """The answer for *exc*, or None if it is not an error of the layer's to answer."""
    if isinstance(exc, CommitUnknown):
        logger.error("responding 500: %s", exc)
        return HttpError(
            500,
            {
                "error": "commit_unknown",
                "detail": "the database may or may not have applied this write; "
                "check before retrying",
                "transaction_id": exc.xid,
                "retry": False,
            },
            {},
        )
    kind = next((k for t, k in _UNAVAILABLE if isinstance(exc, t)), None)
    if kind is not None:
        logger.warning("responding 503 (%s): %s", kind, exc)
        return HttpError(
            503,
            {
                "error": kind,
                "detail": "the database is unavailable right now; try again shortly",
                "retry": True,
            },
            {"Retry-After": str(RETRY_AFTER)},
        )
    return None


def readiness(pool: ResilientPool) -> HttpError:
    """A Kubernetes readiness answer from the pool's state, without a query: 200 when the
    pool is open, has a live connection or can make one, and the server is not known to
    be down; else 503. (Liveness must not depend on the database: answer 200.)

    Every replica turns unready together while the database restarts, although reads
    would wait for it within ``retry.timeout``: give the readiness probe a
    ``failureThreshold`` that covers a restart, or point it at liveness if you prefer
    requests to wait in the pool rather than at the load balancer."""
    stats = pool.stats
    opened = not pool.closed
    ready = opened and not stats.down and (stats.size > 0 or stats.min_size == 0)
    body = {
        "ready": ready,
        "pool": stats.name,
        "size": stats.size,
        "idle": stats.idle,
        "in_use": stats.in_use,
        "waiting": stats.waiting,
        "down": stats.down,
    }
    if not opened:
        body["detail"] = "the pool is not open"
    elif stats.down:
        body["detail"] = f"the database is unreachable: {stats.last_error}"
    return HttpError(200 if ready else 503, body, {} if ready else {"Retry-After": "1"})
