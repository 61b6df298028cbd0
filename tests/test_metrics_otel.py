"""aiopg_resilient.metrics.otel, read back through the SDK's in-memory reader after real
faults (a proxy cut, terminated backends, a refused server, a saturated pool)."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from opentelemetry.metrics import (
    NoOpCounter,
    NoOpHistogram,
    NoOpMeter,
    NoOpMeterProvider,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from aiopg_resilient import PoolEvent, RetryPolicy
from aiopg_resilient.metrics import otel
from aiopg_resilient.metrics._common import BUCKETS
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import until
from .test_metrics_events import (
    HELD,
    OUR_COUNTERS,
    faulty_workload,
    quiet,
    reads,
    saturated,
)

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
OUTCOME = "aiopg_resilient.commit.outcome"
IDLE, USED = {STATE: "idle"}, {STATE: "used"}
SEMCONV_NAMES = ("count", "max", "idle.max", "idle.min", "pending_requests", "timeouts")
EXPECTED = {f"db.client.connection.{name}" for name in SEMCONV_NAMES} | {
    f"db.client.connection.{name}_time" for name in ("create", "wait", "use")
}
EXPECTED |= {f"aiopg_resilient.pool.{name}" for name in ("connecting", "down", *OUR_COUNTERS)}


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    """An in-memory reader on a meter provider of its own, shut down afterwards."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    reader.provider = provider  # type: ignore[attr-defined]
    yield reader
    provider.shutdown()


def provider_of(reader: InMemoryMetricReader) -> MeterProvider:
    provider: MeterProvider = reader.provider  # type: ignore[attr-defined]
    return provider


class Points:
    """One collection of the reader: the metrics by name, their points by pool."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        data = reader.get_metrics_data()
        assert data is not None
        self.metrics = {
            m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        }

    def point(self, name: str, pool: str, **attributes: str) -> Any:
        """The point of *name* for *pool* (and *attributes*); None when there is none."""
        metric = self.metrics.get(name)
        found = [
            p
            for p in (metric.data.data_points if metric is not None else ())
            if (p.attributes or {}).get(POOL) == pool
            and all((p.attributes or {}).get(k) == v for k, v in attributes.items())
        ]
        assert len(found) <= 1, found
        return found[0] if found else None

    def value(self, name: str, pool: str, **attributes: str) -> float:
        point = self.point(name, pool, **attributes)
        assert point is not None, (name, pool, attributes)
        return float(point.value)

    def ours(self, name: str, pool: str) -> float:
        return self.value(f"aiopg_resilient.pool.{name}", pool)


async def test_semantic_conventions_after_real_faults(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str, reader: InMemoryMetricReader
) -> None:
    """After a proxy cut and terminated backends: connection counts match pool.stats,
    create_time counts every connect, wait_time and use_time every borrow (reads plus
    their replays), the loss/retry counters equal the pool's, all in seconds and with
    the pool's name."""
    assert chaos_proxy.dsn is not None
    pool = quiet(chaos_proxy.dsn, app_name, min_size=2, max_size=4)
    handle = otel.instrument(pool, provider_of(reader))
    async with pool:
        done = await faulty_workload(pool, pg, chaos_proxy, app_name)
        await until(lambda: pool.stats.size == 2 and pool.stats.connecting == 0)
        stats, got = pool.stats, Points(reader)
    handle.close()

    assert got.value("db.client.connection.count", app_name, **IDLE) == stats.idle
    assert got.value("db.client.connection.count", app_name, **USED) == 0
    assert got.value("db.client.connection.max", app_name) == 4
    assert got.value("db.client.connection.idle.max", app_name) == 4
    assert got.value("db.client.connection.idle.min", app_name) == 2
    assert got.value("db.client.connection.pending_requests", app_name) == 0
    assert got.value("db.client.connection.timeouts", app_name) == 0

    create = got.point("db.client.connection.create_time", app_name)
    wait = got.point("db.client.connection.wait_time", app_name)
    use = got.point("db.client.connection.use_time", app_name)
    assert create.count == stats.connects >= 4  # 2 at open, and again after each fault
    assert wait.count == use.count == done + stats.retries
    assert 0 < create.sum < 10 * create.count
    assert 0 <= wait.min <= wait.max < 5
    for name in ("create_time", "wait_time", "use_time"):
        assert got.metrics[f"db.client.connection.{name}"].unit == "s"
    assert tuple(create.explicit_bounds) == BUCKETS

    assert got.ours("connections_lost", app_name) == stats.connections_lost >= 2
    assert got.ours("retries", app_name) == stats.retries
    assert got.ours("connect_failures", app_name) == stats.connect_failures
    assert got.ours("heartbeats", app_name) == stats.heartbeats == 0
    assert got.ours("down", app_name) == 0
    assert got.ours("connecting", app_name) == 0
    for outcome in ("committed", "aborted", "unknown"):
        point = got.point("aiopg_resilient.pool.commits_in_doubt", app_name, **{OUTCOME: outcome})
        assert point.value == 0
    assert set(got.metrics) == EXPECTED
    for metric in got.metrics.values():
        assert all((p.attributes or {})[POOL] == app_name for p in metric.data.data_points)


async def test_outage_counts_connect_failures_and_down(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str, reader: InMemoryMetricReader
) -> None:
    """The proxy refuses connects and cuts the sessions: while a read waits, the down
    gauge is 1 and an outage and connect failures are counted; once connects are
    accepted again, the read succeeds and down is 0."""
    assert chaos_proxy.dsn is not None
    retry = RetryPolicy(initial=0.02, max_delay=0.1, timeout=10.0)
    pool = quiet(chaos_proxy.dsn, app_name, min_size=1, max_size=1, retry=retry)
    handle = otel.instrument(pool, provider_of(reader))
    async with pool, anyio.create_task_group() as tg:
        await reads(pool, 2)
        await anyio.to_thread.run_sync(chaos_proxy.refuse)
        await anyio.to_thread.run_sync(chaos_proxy.cut)
        tg.start_soon(reads, pool, 1)
        await until(lambda: pool.stats.down and pool.stats.connect_failures >= 2, timeout=5)
        got = Points(reader)
        assert got.ours("down", app_name) == 1
        assert got.ours("outages", app_name) == 1
        assert got.ours("connect_failures", app_name) >= 2
        await anyio.to_thread.run_sync(chaos_proxy.accept)
        await until(lambda: not pool.stats.down, timeout=5)
    stats, got = pool.stats, Points(reader)
    handle.close()
    assert got.ours("down", app_name) == 0
    assert got.ours("outages", app_name) == 1
    assert got.ours("connect_failures", app_name) == stats.connect_failures
    assert got.point("db.client.connection.create_time", app_name).count == stats.connects


async def test_timeouts_pending_requests_and_waits(
    pg: PostgresServer, app_name: str, reader: InMemoryMetricReader
) -> None:
    """max_size=1 held: a waiting caller is a pending request, its wait lands in
    wait_time, the holder's hold in use_time; a caller that gives up is a timeout."""
    pool = quiet(pg.dsn, app_name, min_size=1, max_size=1, acquire_timeout=1.0)
    handle = otel.instrument(pool, provider_of(reader))

    def pending() -> None:
        got = Points(reader)
        assert got.value("db.client.connection.pending_requests", app_name) == 1
        assert got.value("db.client.connection.count", app_name, **USED) == 1

    async with pool:
        await saturated(pool, pending)
        stats, got = pool.stats, Points(reader)
    handle.close()
    assert got.value("db.client.connection.timeouts", app_name) == stats.acquire_timeouts == 1
    assert got.value("db.client.connection.pending_requests", app_name) == 0
    wait = got.point("db.client.connection.wait_time", app_name)
    use = got.point("db.client.connection.use_time", app_name)
    assert wait.count == use.count == 3  # the two holders and the caller that waited
    assert wait.max >= HELD * 0.75
    assert use.max >= HELD


async def test_two_pools_separate_series_and_close_stops_updates(
    pg: PostgresServer, app_name: str, reader: InMemoryMetricReader
) -> None:
    """Two pools on one provider keep series of their own; a second pool of the same
    name is refused; after close() a pool's counters stop and its gauges go, and the
    name is free again (here on the global provider, OpenTelemetry's no-op default)."""
    a, b = quiet(pg.dsn, app_name), quiet(pg.dsn, f"{app_name}b")
    provider = provider_of(reader)
    handle_a, handle_b = otel.instrument(a, provider), otel.instrument(b, provider)
    with pytest.raises(ValueError, match="already instrumented"):
        otel.instrument(quiet(pg.dsn, app_name), provider)
    async with a, b:
        await reads(a, 5)
        await reads(b, 3)
        got = Points(reader)
        assert got.point("db.client.connection.wait_time", app_name).count == 5
        assert got.point("db.client.connection.wait_time", f"{app_name}b").count == 3
        handle_a.close()
        handle_a.uninstrument()  # idempotent
        await reads(a, 4)
        await reads(b, 4)
        got = Points(reader)
        handle_b.close()
        with otel.instrument(a):
            await reads(a, 1)
        assert a._events.per_op is False
    assert got.point("db.client.connection.wait_time", app_name).count == 5
    assert got.point("db.client.connection.use_time", app_name).count == 5
    assert got.point("db.client.connection.wait_time", f"{app_name}b").count == 7
    assert got.point("db.client.connection.count", app_name, **IDLE) is None
    assert got.value("db.client.connection.count", f"{app_name}b", **IDLE) == 1


class _Broken(NoOpMeterProvider):
    """A metrics backend whose instruments raise once armed."""

    armed = False

    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> NoOpMeter:
        provider = self

        class Counter(NoOpCounter):
            def add(self, amount: float, *args: Any, **kwargs: Any) -> None:
                if provider.armed:
                    raise RuntimeError("metrics backend down")

        class Histogram(NoOpHistogram):
            def record(self, amount: float, *args: Any, **kwargs: Any) -> None:
                if provider.armed:
                    raise RuntimeError("metrics backend down")

        class Meter(NoOpMeter):
            def create_counter(self, name: str, *args: Any, **kwargs: Any) -> NoOpCounter:
                return Counter(name)

            def create_histogram(self, name: str, *args: Any, **kwargs: Any) -> NoOpHistogram:
                return Histogram(name)

        return Meter(name)


async def test_a_failing_backend_never_breaks_the_pool(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Instruments that raise on every record: reads through real faults still succeed,
    the pool's stats stay exact, and the failure is logged once at WARNING."""
    assert chaos_proxy.dsn is not None
    broken = _Broken()
    seen: list[PoolEvent] = []
    pool = quiet(chaos_proxy.dsn, app_name, min_size=2, max_size=2, on_event=seen.append)
    handle = otel.instrument(pool, broken)
    broken.armed = True
    with caplog.at_level(logging.DEBUG, logger="aiopg_resilient.metrics"):
        async with pool:
            done = await faulty_workload(pool, pg, chaos_proxy, app_name)
            stats = pool.stats
    handle.close()
    assert done == 30
    assert handle.failures >= done
    ours = [r for r in caplog.records if r.name == "aiopg_resilient.metrics"]
    assert [r.levelno for r in ours] == [logging.WARNING] + [logging.DEBUG] * (len(ours) - 1)
    assert "in its metrics failed" in ours[0].getMessage()
    assert stats.connects == sum(e.kind == "connect" for e in seen)
    assert stats.connections_lost == sum(e.kind == "lost" for e in seen)


def test_import_without_opentelemetry_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the library, importing the adapter says what to install."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "aiopg_resilient.metrics.otel")
    with pytest.raises(ImportError, match=r"pip install 'aiopg-resilient\[otel\]'"):
        importlib.import_module("aiopg_resilient.metrics.otel")
