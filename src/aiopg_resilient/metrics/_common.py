"""What the two metrics adapters share: the metrics (names, units, what feeds each) and
the handle `instrument` returns, one more reader of the pool's event stream.

Counters and histograms are fed by `PoolEvent` only (``TIMED`` and ``COUNTED`` say which
kind feeds which); the gauges (``GAUGES``) are read from ``pool.stats`` when the metrics
are collected. Nothing here imports OpenTelemetry or prometheus_client.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, TypeVar

from .._events import PoolEvent
from .._pool import ResilientPool
from .._stats import PoolStats

__all__ = [
    "BUCKETS",
    "COUNTED",
    "GAUGES",
    "METRICS",
    "OUTCOMES",
    "POOL",
    "TIMED",
    "Instrumentation",
    "Label",
    "Metric",
    "check_unique",
]

logger = logging.getLogger("aiopg_resilient.metrics")

_H = TypeVar("_H", bound="Instrumentation")


@dataclass(frozen=True)
class Label:
    """An attribute (OpenTelemetry) / label (Prometheus) of a metric."""

    otel: str
    prom: str


POOL = Label("db.client.connection.pool.name", "pool_name")
STATE = Label("db.client.connection.state", "state")
OUTCOME = Label("aiopg_resilient.commit.outcome", "outcome")
OUTCOMES = ("committed", "aborted", "unknown")


@dataclass(frozen=True)
class Metric:
    """One metric: its OpenTelemetry name and unit (UCUM), its Prometheus name (a
    counter's without ``_total``, which the client adds), and a second label besides
    the pool's name, if any."""

    otel: str
    prom: str
    unit: str
    kind: Literal["counter", "histogram", "updown", "gauge"]
    doc: str
    label: Label | None = None


def _semconv(name: str, unit: str, kind: Literal["counter", "updown"], doc: str) -> Metric:
    prom = "db_client_connection_" + name.replace(".", "_")
    return Metric(f"db.client.connection.{name}", prom, unit, kind, doc)


def _ours(name: str, unit: str, kind: Literal["counter", "updown", "gauge"], doc: str) -> Metric:
    return Metric(f"aiopg_resilient.pool.{name}", f"aiopg_resilient_pool_{name}", unit, kind, doc)


def _seconds(name: str, doc: str) -> Metric:
    otel = f"db.client.connection.{name}"
    return Metric(otel, f"db_client_connection_{name}_seconds", "s", "histogram", doc)


COUNT = Metric(
    "db.client.connection.count",
    "db_client_connection_count",
    "{connection}",
    "updown",
    "Open connections in each state: idle, or used (borrowed, or being checked).",
    STATE,
)
IDLE_MAX = _semconv(
    "idle.max", "{connection}", "updown", "Most idle connections allowed (max_size)."
)
IDLE_MIN = _semconv(
    "idle.min", "{connection}", "updown", "Connections the pool keeps open (min_size)."
)
MAX = _semconv("max", "{connection}", "updown", "Most open connections allowed (max_size).")
PENDING = _semconv("pending_requests", "{request}", "updown", "Callers waiting for a connection.")
TIMEOUTS = _semconv(
    "timeouts", "{timeout}", "counter", "Callers that got PoolTimeout waiting for a connection."
)
CREATE_TIME = _seconds("create_time", "Seconds a new connection took (connect, TLS, login).")
WAIT_TIME = _seconds("wait_time", "Seconds a caller waited for a connection.")
USE_TIME = _seconds("use_time", "Seconds between borrowing a connection and its return.")
CONNECTING = _ours("connecting", "{connection}", "updown", "Connection attempts in flight.")
DOWN = _ours("down", "1", "gauge", "1 while the server is unreachable and the pool is probing it.")
CONNECT_FAILURES = _ours("connect_failures", "{attempt}", "counter", "Failed connects.")
LOST = _ours(
    "connections_lost",
    "{connection}",
    "counter",
    "Connections found dead: by a query, a check at checkout, a heartbeat or a listener.",
)
RETRIES = _ours("retries", "{retry}", "counter", "Operations re-run after a transient failure.")
HEARTBEATS = _ours("heartbeats", "{heartbeat}", "counter", "Heartbeats sent to idle connections.")
HEARTBEAT_FAILURES = _ours(
    "heartbeat_failures", "{heartbeat}", "counter", "Heartbeats that failed or timed out."
)
OUTAGES = _ours(
    "outages", "{outage}", "counter", "Times the server became unreachable (pool down)."
)
COMMITS = Metric(
    "aiopg_resilient.pool.commits_in_doubt",
    "aiopg_resilient_pool_commits_in_doubt",
    "{commit}",
    "counter",
    "COMMITs whose answer was lost, by outcome: committed or aborted (established through "
    "the transaction id), or unknown (CommitUnknown).",
    OUTCOME,
)

TIMED: dict[str, Metric] = {"connect": CREATE_TIME, "acquire": WAIT_TIME, "release": USE_TIME}
"""Event kind -> the histogram of its ``duration``."""

COUNTED: dict[str, Metric] = {
    "acquire_timeout": TIMEOUTS,
    "connect_failed": CONNECT_FAILURES,
    "lost": LOST,
    "retry": RETRIES,
    "heartbeat": HEARTBEATS,
    "heartbeat_failed": HEARTBEAT_FAILURES,
    "down": OUTAGES,
    "commit_resolved": COMMITS,
    "commit_unknown": COMMITS,
}
"""Event kind -> the counter it adds one to."""

Read = Callable[[PoolStats], float]
GAUGES: dict[Metric, tuple[tuple[str | None, Read], ...]] = {
    COUNT: (("idle", lambda s: s.idle), ("used", lambda s: s.in_use)),
    MAX: ((None, lambda s: s.max_size),),
    IDLE_MAX: ((None, lambda s: s.max_size),),
    IDLE_MIN: ((None, lambda s: s.min_size),),
    PENDING: ((None, lambda s: s.waiting),),
    CONNECTING: ((None, lambda s: s.connecting),),
    DOWN: ((None, lambda s: int(s.down)),),
}
"""Gauge -> (its second label's value, how to read it from `PoolStats`)."""

METRICS: tuple[Metric, ...] = (
    *GAUGES,
    *TIMED.values(),
    *dict.fromkeys(COUNTED.values()),
)

BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Histogram bucket bounds, in seconds: from a free idle connection (tens of
microseconds) to a connect across an outage."""


class Instrumentation:
    """A pool's metrics, as ``instrument()`` returns them: a reader of the pool's events
    (subscribed with ``per_operation=True``) until `close` (or `uninstrument`).

    Recording never breaks the pool: a failing metrics backend is logged once at WARNING
    (later failures at DEBUG) on the ``aiopg_resilient.metrics`` logger. The handle holds
    the pool weakly; a pool that is garbage collected simply stops being observed.
    """

    def __init__(self, pool: ResilientPool) -> None:
        self.pool_name = pool.name
        self.closed = False
        self.failures = 0
        """Events whose recording failed (see the class doc)."""
        self._pool = weakref.ref(pool)
        self._unsubscribe: Callable[[], None] | None = None

    def _start(self) -> None:
        """Start reading the pool's events (once the backend accepted this handle)."""
        pool = self._pool()
        if pool is not None:
            self._unsubscribe = pool.subscribe(self._on_event, per_operation=True)

    def gauges(self, metric: Metric) -> list[tuple[str | None, float]]:
        """*metric*'s values now, read from ``pool.stats``: none once closed."""
        pool = self._pool()
        if pool is None or self.closed:
            return []
        stats = pool.stats
        return [(label, read(stats)) for label, read in GAUGES[metric]]

    def _on_event(self, event: PoolEvent) -> None:
        try:
            metric = TIMED.get(event.kind)
            if metric is not None:
                if event.duration is not None:
                    self._observe(metric, event.duration)
                return
            metric = COUNTED.get(event.kind)
            if metric is not None:
                self._count(metric, None if metric.label is None else event.outcome or "unknown")
        except Exception:
            self.failures += 1
            level = logging.WARNING if self.failures == 1 else logging.DEBUG
            logger.log(
                level,
                "pool %r: recording a %r event in its metrics failed (%d so far; the pool "
                "is not affected, further failures are logged at DEBUG)",
                self.pool_name,
                event.kind,
                self.failures,
                exc_info=True,
            )

    def _observe(self, metric: Metric, seconds: float) -> None:
        raise NotImplementedError

    def _count(self, metric: Metric, label: str | None) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        """Leave the backend (after the last event was read)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop: no more events are read nor gauges observed; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._detach()

    def uninstrument(self) -> None:
        """The same as `close`."""
        self.close()

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} pool={self.pool_name!r} {state}>"


def check_unique(handles: Sequence[Instrumentation], pool: ResilientPool, where: str) -> None:
    """One series per pool name. The instrumentation of a pool of the same name that
    was closed (or garbage collected) is closed: the new pool replaces it (a restarted
    application). A live one is a clash: `ValueError`."""
    for handle in list(handles):
        if handle.pool_name != pool.name or handle.closed:
            continue
        old = handle._pool()
        if old is None or old._closed:
            handle.close()
            continue
        raise ValueError(
            f"a pool named {pool.name!r} is already instrumented on this {where}: give "
            "each pool a name of its own (ResilientPool(..., name=...)), or close() the "
            "first instrumentation"
        )
