"""Metrics of a `ResilientPool`, read from its event stream (optional extras).

```python
from aiopg_resilient.metrics import otel, prometheus

otel.instrument(pool)          # pip install 'aiopg-resilient[otel]'
prometheus.instrument(pool)    # pip install 'aiopg-resilient[prometheus]'
```

Both export the OpenTelemetry database client connection-pool conventions
(``db.client.connection.*``, with ``db.client.connection.pool.name``) and the pool's own
counters under ``aiopg_resilient.pool.*``; ``instrument`` returns a handle whose
``close()`` stops it. Counters and histograms are fed by the pool's events (`PoolEvent`),
the gauges by ``pool.stats``. A pool that is not instrumented pays nothing for this
package, and importing it imports neither library: each module imports its own on first
use, and raises `ImportError` naming the extra to install when it is missing. See
``docs/metrics.md``.
"""
