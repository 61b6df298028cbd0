"""aiopg_resilient.metrics.prometheus, scraped back from a registry after real faults (a
proxy cut, terminated backends, a saturated pool), scrapes running in another thread."""

from __future__ import annotations

import importlib
import re
import sys
import threading

import anyio
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aiopg_resilient.metrics import prometheus
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .test_metrics_events import (
    HELD,
    OUR_COUNTERS,
    faulty_workload,
    quiet,
    reads,
    saturated,
)

SEMCONV = "db_client_connection"
OURS = "aiopg_resilient_pool"


def sample(registry: CollectorRegistry, name: str, pool: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"pool_name": pool, **labels})


def scrape_checked(registry: CollectorRegistry) -> int:
    """One text scrape, parsed: every histogram's +Inf bucket is its count, buckets
    grow with ``le``. Returns how many histogram series it saw."""
    seen = 0
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        series: dict[str, list[float]] = {}
        counts = {}
        for s in family.samples:
            pool = s.labels["pool_name"]
            if s.name.endswith("_bucket"):
                series.setdefault(pool, []).append(s.value)
            elif s.name.endswith("_count"):
                counts[pool] = s.value
        for pool, buckets in series.items():
            assert buckets == sorted(buckets)
            assert buckets[-1] == counts[pool]
            seen += 1
    return seen


async def test_conventions_after_real_faults_scraped_meanwhile(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """A scraper thread runs throughout a proxy cut and terminated backends (every
    scrape consistent); afterwards the counts match pool.stats, create_time counts every
    connect, wait_time and use_time every borrow, the counters equal the pool's."""
    assert chaos_proxy.dsn is not None
    registry = CollectorRegistry()
    pool = quiet(chaos_proxy.dsn, app_name, min_size=2, max_size=4)
    handle = prometheus.instrument(pool, registry)
    stop, scrapes, errors = threading.Event(), [], []

    def scraper() -> None:
        while not stop.is_set():
            try:
                scrapes.append(scrape_checked(registry))
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)
                return

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    try:
        async with pool:
            done = await faulty_workload(pool, pg, chaos_proxy, app_name)
            stats = pool.stats
            values = {
                "idle": sample(registry, f"{SEMCONV}_count", app_name, state="idle"),
                "used": sample(registry, f"{SEMCONV}_count", app_name, state="used"),
                "create": sample(registry, f"{SEMCONV}_create_time_seconds_count", app_name),
                "wait": sample(registry, f"{SEMCONV}_wait_time_seconds_count", app_name),
                "use": sample(registry, f"{SEMCONV}_use_time_seconds_count", app_name),
                "use_inf": sample(
                    registry, f"{SEMCONV}_use_time_seconds_bucket", app_name, le="+Inf"
                ),
                "lost": sample(registry, f"{OURS}_connections_lost_total", app_name),
                "retries": sample(registry, f"{OURS}_retries_total", app_name),
                "failures": sample(registry, f"{OURS}_connect_failures_total", app_name),
            }
    finally:
        stop.set()
        await anyio.to_thread.run_sync(thread.join, 10)
    handle.close()
    assert errors == []
    assert len(scrapes) >= 1
    assert all(seen == 3 for seen in scrapes)  # the three histograms of one pool

    assert values["idle"] == stats.idle
    assert values["used"] == stats.in_use
    assert values["create"] == stats.connects >= 4
    assert values["wait"] == values["use"] == values["use_inf"] == done + stats.retries
    assert values["lost"] == stats.connections_lost >= 2
    assert values["retries"] == stats.retries
    assert values["failures"] == stats.connect_failures


async def test_gauges_timeouts_and_text_format(pg: PostgresServer, app_name: str) -> None:
    """max_size=1 held: the waiting caller shows in pending_requests (scraped from
    another thread), a caller that gives up in timeouts_total; the exposition has the
    Prometheus names, types and labels."""
    registry = CollectorRegistry()
    pool = quiet(pg.dsn, app_name, min_size=1, max_size=1, acquire_timeout=1.0)

    async def pending() -> None:
        text = (await anyio.to_thread.run_sync(generate_latest, registry)).decode()
        assert f'{SEMCONV}_pending_requests{{pool_name="{app_name}"}} 1.0' in text
        assert f'{SEMCONV}_count{{pool_name="{app_name}",state="used"}} 1.0' in text

    with prometheus.instrument(pool, registry):  # read while open: close() drops the series
        async with pool:
            await saturated(pool, pending)
            stats = pool.stats
        text = generate_latest(registry).decode()
        assert (
            sample(registry, f"{SEMCONV}_timeouts_total", app_name) == stats.acquire_timeouts == 1
        )
        assert f"# TYPE {SEMCONV}_wait_time_seconds histogram" in text
        assert f"# TYPE {SEMCONV}_timeouts_total counter" in text
        assert f"# TYPE {SEMCONV}_max gauge" in text
        assert f'{SEMCONV}_max{{pool_name="{app_name}"}} 1.0' in text
        assert f'{SEMCONV}_idle_min{{pool_name="{app_name}"}} 1.0' in text
        assert f'{SEMCONV}_idle_max{{pool_name="{app_name}"}} 1.0' in text
        assert f'{SEMCONV}_pending_requests{{pool_name="{app_name}"}} 0.0' in text
        assert f'{SEMCONV}_use_time_seconds_bucket{{le="0.0001",pool_name="{app_name}"}}' in text
        assert f'{SEMCONV}_wait_time_seconds_count{{pool_name="{app_name}"}} 3.0' in text
        use_sum = sample(registry, f"{SEMCONV}_use_time_seconds_sum", app_name)
        assert use_sum is not None
        assert use_sum >= HELD
        for outcome in ("committed", "aborted", "unknown"):
            name = f"{OURS}_commits_in_doubt_total"
            assert sample(registry, name, app_name, outcome=outcome) == 0
        assert sample(registry, f"{OURS}_down", app_name) == 0
        assert sample(registry, f"{OURS}_outages_total", app_name) == 0
        assert sample(registry, f"{OURS}_heartbeats_total", app_name) == stats.heartbeats == 0


async def test_two_pools_close_and_the_default_registry(pg: PostgresServer, app_name: str) -> None:
    """Two pools keep series of their own; a second pool of a taken name is refused;
    close() removes a pool's series and, with the last one, the collector; without a
    registry, prometheus_client's default REGISTRY is used."""
    registry = CollectorRegistry()
    a, b = quiet(pg.dsn, app_name), quiet(pg.dsn, f"{app_name}b")
    handle_a, handle_b = prometheus.instrument(a, registry), prometheus.instrument(b, registry)
    with pytest.raises(ValueError, match="already instrumented"):
        prometheus.instrument(quiet(pg.dsn, app_name), registry)
    wait = f"{SEMCONV}_wait_time_seconds_count"
    async with a, b:
        await reads(a, 5)
        await reads(b, 3)
        assert sample(registry, wait, app_name) == 5
        assert sample(registry, wait, f"{app_name}b") == 3
        handle_a.close()
        await reads(a, 2)
        await reads(b, 2)
        assert sample(registry, wait, app_name) is None
        assert sample(registry, f"{SEMCONV}_count", app_name, state="idle") is None
        assert sample(registry, wait, f"{app_name}b") == 5
        handle_b.uninstrument()
        assert SEMCONV not in generate_latest(registry).decode()
        assert a._events.per_op is False
        assert b._events.per_op is False

        with prometheus.instrument(a):  # the default registry
            await reads(a, 2)
            assert sample(REGISTRY, wait, app_name) == 2
        assert sample(REGISTRY, wait, app_name) is None
        assert SEMCONV not in generate_latest(REGISTRY).decode()


async def test_a_new_pool_replaces_a_closed_one_of_the_same_name(
    pg: PostgresServer, app_name: str
) -> None:
    """An application started again: its new pool, of the same name, replaces the
    closed one whose instrumentation was never closed; the series are the new pool's."""
    registry = CollectorRegistry()
    wait = f"{SEMCONV}_wait_time_seconds_count"
    old = quiet(pg.dsn, app_name)
    old_handle = prometheus.instrument(old, registry)
    async with old:
        await reads(old, 3)
    assert sample(registry, wait, app_name) == 3
    new = quiet(pg.dsn, app_name)
    with prometheus.instrument(new, registry):
        assert old_handle.closed
        async with new:
            await reads(new, 2)
            assert sample(registry, wait, app_name) == 2
            with pytest.raises(ValueError, match="already instrumented"):
                prometheus.instrument(quiet(pg.dsn, app_name), registry)
    assert SEMCONV not in generate_latest(registry).decode()


async def test_a_name_taken_by_another_collector_is_refused_cleanly(
    pg: PostgresServer, app_name: str
) -> None:
    """A registry where another collector already exports one of the names: a clear
    ValueError, and the pool is left as it was (no reader subscribed)."""
    registry = CollectorRegistry()
    Gauge(f"{SEMCONV}_count", "someone else's", registry=registry)
    pool = quiet(pg.dsn, app_name)
    with pytest.raises(ValueError, match="Duplicated"):
        prometheus.instrument(pool, registry)
    async with pool:
        await reads(pool, 2)
        assert pool._events.per_op is False


async def test_the_fastapi_wiring_of_the_docs(pg: PostgresServer, app_name: str) -> None:
    """docs/metrics.md's FastAPI lines: the pool's series are served on /metrics."""
    import httpx
    from fastapi import FastAPI
    from prometheus_client import make_asgi_app

    from aiopg_resilient.integrations.fastapi import pool_lifespan

    registry = CollectorRegistry()
    pool = quiet(pg.dsn, app_name)
    prometheus.instrument(pool, registry)
    app = FastAPI(lifespan=pool_lifespan(pool))
    app.mount("/metrics", make_asgi_app(registry))

    @app.get("/value")
    async def value() -> int:
        return int(await pool.fetchval("SELECT 41 + 1"))

    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://app") as client,
    ):
        assert (await client.get("/value")).json() == 42
        text = (await client.get("/metrics/")).text
    assert f'{SEMCONV}_count{{pool_name="{app_name}",state="idle"}} 1.0' in text
    assert f'{SEMCONV}_use_time_seconds_count{{pool_name="{app_name}"}} 1.0' in text


def test_names_are_classic_prometheus_names() -> None:
    """Every family name is valid for every Prometheus (no dots, which newer clients
    would escape silently); the set is the documented one, with the documented types."""
    registry = CollectorRegistry()
    collector = prometheus._PoolCollector()
    registry.register(collector)
    names = {family.name: family.type for family in registry.collect()}
    registry.unregister(collector)
    assert all(re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name) for name in names), names
    assert names == {
        **{f"{SEMCONV}_{n}": "gauge" for n in ("count", "max", "idle_max", "idle_min")},
        f"{SEMCONV}_pending_requests": "gauge",
        f"{SEMCONV}_timeouts": "counter",  # exposed as _total
        **{f"{SEMCONV}_{n}_time_seconds": "histogram" for n in ("create", "wait", "use")},
        f"{OURS}_connecting": "gauge",
        f"{OURS}_down": "gauge",
        **{f"{OURS}_{n}": "counter" for n in OUR_COUNTERS},
    }


def test_import_without_prometheus_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the library, importing the adapter says what to install."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "aiopg_resilient.metrics.prometheus")
    with pytest.raises(ImportError, match=r"pip install 'aiopg-resilient\[prometheus\]'"):
        importlib.import_module("aiopg_resilient.metrics.prometheus")
