"""Prometheus metrics of a `ResilientPool` (extra ``prometheus``).

```python
from aiopg_resilient.metrics import prometheus

metrics = prometheus.instrument(pool)             # prometheus_client's default REGISTRY
metrics = prometheus.instrument(pool, registry)   # or yours
...
metrics.close()                                   # stop (alias: uninstrument())
```

The same metrics as `aiopg_resilient.metrics.otel`, named the Prometheus way: dots
become underscores, histograms end in ``_seconds``, counters in ``_total``, and every
series has ``pool_name="<the pool's name>"`` (``db_client_connection_count`` also
``state="idle"|"used"``, ``aiopg_resilient_pool_commits_in_doubt_total`` also
``outcome``). One collector per registry serves every pool instrumented on it, and
leaves the registry when the last one is closed. Scrapes may run in another thread
(``start_http_server``): each pool's numbers are read under a lock of its own.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterable

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.core import Metric as Family
    from prometheus_client.registry import Collector
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "aiopg_resilient.metrics.prometheus needs prometheus_client: "
        "pip install 'aiopg-resilient[prometheus]'"
    ) from exc

from .._pool import ResilientPool
from ._common import (
    BUCKETS,
    COUNTED,
    METRICS,
    OUTCOMES,
    POOL,
    TIMED,
    Instrumentation,
    Metric,
    check_unique,
)

__all__ = ["PrometheusInstrumentation", "instrument"]

_LE = [floatToGoString(bound) for bound in BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]


def instrument(
    pool: ResilientPool, registry: CollectorRegistry | None = None
) -> PrometheusInstrumentation:
    """Export *pool*'s metrics to a Prometheus registry until the handle is closed.

    *registry* defaults to prometheus_client's ``REGISTRY``. Instrument before
    ``pool.open()`` for counters that match ``pool.stats`` from the first connect.
    Raises `ValueError` when an open pool of the same name is already instrumented on
    that registry (one that was closed is replaced, its instrumentation closed), or when
    another collector there already exports one of these names.
    """
    target = REGISTRY if registry is None else registry
    collector = _collectors.get(target)
    if collector is not None:
        check_unique(collector.handles, pool, "registry")  # may close the last one
        collector = _collectors.get(target)
    if collector is None:
        collector = _PoolCollector()
        target.register(collector)  # refuses names another collector has
        _collectors[target] = collector
    return PrometheusInstrumentation(pool, collector, target)


class PrometheusInstrumentation(Instrumentation):
    """A pool's Prometheus metrics (see `instrument`); ``close()`` stops them and
    removes the pool's series from the registry."""

    def __init__(
        self, pool: ResilientPool, collector: _PoolCollector, registry: CollectorRegistry
    ) -> None:
        super().__init__(pool)
        self._collector = collector
        self._registry = registry
        self._lock = threading.Lock()
        self._counts: dict[Metric, dict[str | None, int]] = {
            metric: dict.fromkeys(OUTCOMES if metric.label else (None,), 0)
            for metric in dict.fromkeys(COUNTED.values())
        }
        self._histograms = {metric: _Histogram() for metric in TIMED.values()}
        collector.handles.append(self)
        self._start()

    def _observe(self, metric: Metric, seconds: float) -> None:
        with self._lock:
            self._histograms[metric].observe(seconds)

    def _count(self, metric: Metric, label: str | None) -> None:
        with self._lock:
            counts = self._counts[metric]
            counts[label] = counts.get(label, 0) + 1

    def histogram(self, metric: Metric) -> tuple[list[tuple[str, float]], float]:
        """*metric*'s cumulative buckets (``le``, count) and sum, now."""
        with self._lock:
            return self._histograms[metric].snapshot()

    def counts(self, metric: Metric) -> list[tuple[str | None, int]]:
        """*metric*'s counts now, by its second label's value (None: it has none)."""
        with self._lock:
            return list(self._counts[metric].items())

    def _detach(self) -> None:
        self._collector.handles.remove(self)
        self._collector.leave_if_empty(self._registry)


class _PoolCollector(Collector):
    """The collector of one registry: every instrumented pool's series."""

    def __init__(self) -> None:
        self.handles: list[PrometheusInstrumentation] = []

    def describe(self) -> Iterable[Family]:
        """The names this collector exports (for the registry's duplicate check)."""
        return list(_families([]))

    def collect(self) -> Iterable[Family]:
        return _families(list(self.handles))

    def leave_if_empty(self, registry: CollectorRegistry) -> None:
        if not self.handles and _collectors.get(registry) is self:
            del _collectors[registry]
            registry.unregister(self)


def _families(handles: list[PrometheusInstrumentation]) -> Iterable[Family]:
    """Every metric's family, with the samples of *handles*."""
    for metric in METRICS:
        labels = [POOL.prom] if metric.label is None else [POOL.prom, metric.label.prom]
        family: Family
        if metric.kind == "histogram":
            family = hist = HistogramMetricFamily(
                metric.prom, metric.doc, labels=labels, unit="seconds"
            )
            for handle in handles:
                buckets, total = handle.histogram(metric)
                hist.add_metric([handle.pool_name], buckets, total)
        elif metric.kind == "counter":
            family = counter = CounterMetricFamily(metric.prom, metric.doc, labels=labels)
            for handle in handles:
                for label, count in handle.counts(metric):
                    counter.add_metric(_values(handle, label), count)
        else:
            family = gauge = GaugeMetricFamily(metric.prom, metric.doc, labels=labels)
            for handle in handles:
                for label, value in handle.gauges(metric):
                    gauge.add_metric(_values(handle, label), value)
        yield family


def _values(handle: PrometheusInstrumentation, label: str | None) -> list[str]:
    return [handle.pool_name] if label is None else [handle.pool_name, label]


class _Histogram:
    """Bucket counts (``le`` bounds: `BUCKETS`) and the sum of one pool's durations."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        cumulative, buckets = 0, []
        for le, count in zip(_LE, self.counts, strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        return buckets, self.total


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _PoolCollector] = (
    weakref.WeakKeyDictionary()
)
