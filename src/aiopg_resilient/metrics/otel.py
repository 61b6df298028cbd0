"""OpenTelemetry metrics of a `ResilientPool` (extra ``otel``).

```python
from aiopg_resilient.metrics import otel

metrics = otel.instrument(pool)                  # the global MeterProvider
metrics = otel.instrument(pool, meter_provider)  # or yours
...
metrics.close()                                  # stop (alias: uninstrument())
```

The database client connection-pool semantic conventions (``db.client.connection.*``,
every point with ``db.client.connection.pool.name`` = the pool's name) and the pool's
own counters (``aiopg_resilient.pool.*``); names, units and what feeds each are listed
in ``docs/metrics.md``. Instruments are created once per meter provider (meter
``aiopg_resilient``) and shared by the pools instrumented on it, each pool's points told
apart by its name: give every pool its own ``name``. Configure the meter provider before
instrumenting (a pool instrumented on the global provider before it is set goes through
OpenTelemetry's proxy).

The histograms advise bucket bounds in seconds (100 µs to 30 s; ``opentelemetry-api``
1.30 and later, the declared floor); a View of yours still overrides them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    from opentelemetry import metrics as _otel
    from opentelemetry.metrics import (
        CallbackOptions,
        Counter,
        Histogram,
        Meter,
        MeterProvider,
        Observation,
    )
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "aiopg_resilient.metrics.otel needs the OpenTelemetry API: "
        "pip install 'aiopg-resilient[otel]'"
    ) from exc

from .._pool import ResilientPool
from ._common import (
    BUCKETS,
    COUNTED,
    GAUGES,
    OUTCOMES,
    POOL,
    TIMED,
    Instrumentation,
    Metric,
    check_unique,
)

__all__ = ["OtelInstrumentation", "instrument"]

SCOPE = "aiopg_resilient"


def instrument(
    pool: ResilientPool, meter_provider: MeterProvider | None = None
) -> OtelInstrumentation:
    """Export *pool*'s metrics through OpenTelemetry until the handle is closed.

    *meter_provider* defaults to the global one. Instrument before ``pool.open()`` for
    counters that match ``pool.stats`` from the first connect. Raises `ValueError` when
    an open pool of the same name is already instrumented on that provider; one that was
    closed (an application started again) is replaced, its instrumentation closed.
    """
    provider = meter_provider if meter_provider is not None else _otel.get_meter_provider()
    instruments = _shared.get(provider)
    if instruments is None:
        instruments = _shared[provider] = _Instruments(provider.get_meter(SCOPE, _version()))
    check_unique(instruments.handles, pool, "meter provider")
    return OtelInstrumentation(pool, instruments)


class OtelInstrumentation(Instrumentation):
    """A pool's OpenTelemetry metrics (see `instrument`); ``close()`` stops them."""

    def __init__(self, pool: ResilientPool, instruments: _Instruments) -> None:
        super().__init__(pool)
        self.attributes: dict[str, str] = {POOL.otel: pool.name}
        self._instruments = instruments
        instruments.handles.append(self)
        try:
            # Every counter has a point from the start: rate() and increase() see the first.
            for metric, counter in instruments.counters.items():
                for label in OUTCOMES if metric.label is not None else (None,):
                    counter.add(0, self._attributes(metric, label))
        except BaseException:
            instruments.handles.remove(self)
            raise
        self._start()

    def _attributes(self, metric: Metric, label: str | None) -> dict[str, str]:
        if label is None or metric.label is None:
            return self.attributes
        return {**self.attributes, metric.label.otel: label}

    def _observe(self, metric: Metric, seconds: float) -> None:
        self._instruments.histograms[metric].record(seconds, self.attributes)

    def _count(self, metric: Metric, label: str | None) -> None:
        self._instruments.counters[metric].add(1, self._attributes(metric, label))

    def _detach(self) -> None:
        self._instruments.handles.remove(self)


class _Instruments:
    """The instruments of one meter provider, shared by every pool instrumented on it
    (OpenTelemetry registers a name once per meter: a second registration would get the
    first one back, without its own callbacks)."""

    def __init__(self, meter: Meter) -> None:
        self.handles: list[OtelInstrumentation] = []
        self.counters: dict[Metric, Counter] = {
            metric: meter.create_counter(metric.otel, unit=metric.unit, description=metric.doc)
            for metric in dict.fromkeys(COUNTED.values())
        }
        self.histograms: dict[Metric, Histogram] = {
            metric: _histogram(meter, metric) for metric in TIMED.values()
        }
        for metric in GAUGES:
            create = (
                meter.create_observable_gauge
                if metric.kind == "gauge"
                else meter.create_observable_up_down_counter
            )
            create(
                metric.otel,
                callbacks=[self._observer(metric)],
                unit=metric.unit,
                description=metric.doc,
            )

    def _observer(self, metric: Metric) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(value, handle._attributes(metric, label))
                for handle in list(self.handles)
                for label, value in handle.gauges(metric)
            ]

        return observe


def _histogram(meter: Meter, metric: Metric) -> Histogram:
    kwargs: dict[str, Any] = {"unit": metric.unit, "description": metric.doc}
    return meter.create_histogram(
        metric.otel, explicit_bucket_boundaries_advisory=BUCKETS, **kwargs
    )


def _version() -> str | None:
    try:
        return version("aiopg-resilient")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return None


_shared: weakref.WeakKeyDictionary[MeterProvider, _Instruments] = weakref.WeakKeyDictionary()
