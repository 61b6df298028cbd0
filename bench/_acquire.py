"""Acquire latency: borrow an idle connection and give it back, nothing run on it, one task,
a pool of one connection; p50 and p99 over interleaved rounds."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from _common import log
from _contenders import Contender

from aiopg_resilient.testing import PostgresServer


@dataclass
class Acquire:
    key: str
    contender: str
    samples: int
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float


async def bench_acquire(
    pg: PostgresServer,
    contenders: Sequence[Contender],
    count: int,
    rounds: int,
    warmup: int = 50,
    cap: float = 5.0,
) -> list[Acquire]:
    """*count* borrows per contender, split over *rounds* rounds (every other round in
    reverse order), each round after *warmup* unrecorded borrows and within *cap* seconds."""
    samples: dict[str, list[int]] = {c.key: [] for c in contenders}
    per_round = max(1, count // rounds)
    for rnd in range(rounds):
        order = list(contenders) if rnd % 2 == 0 else list(contenders)[::-1]
        for c in order:
            gc.collect()
            async with c.open(pg, 1) as subject:
                for _ in range(warmup):
                    await subject.borrow()
                deadline = time.monotonic() + cap
                times = samples[c.key]
                for _ in range(per_round):
                    t0 = time.perf_counter_ns()
                    await subject.borrow()
                    times.append(time.perf_counter_ns() - t0)
                    if time.monotonic() > deadline:
                        break
    results = []
    for c in contenders:
        us = [t / 1000 for t in samples[c.key]]
        p99 = statistics.quantiles(us, n=100, method="inclusive")[98] if len(us) > 1 else us[0]
        results.append(
            Acquire(
                key=c.key,
                contender=c.name,
                samples=len(us),
                p50_us=round(statistics.median(us), 1),
                p99_us=round(p99, 1),
                mean_us=round(statistics.fmean(us), 1),
                max_us=round(max(us), 1),
            )
        )
        log.info(
            "acquire %-24s p50 %7.1f us, p99 %7.1f us (%d samples)",
            c.name,
            results[-1].p50_us,
            results[-1].p99_us,
            len(us),
        )
    return results
