"""Throughput: each contender's ``SELECT 1`` rate (answers checked) at each concurrency over
interleaved rounds, with make-up rounds for the cells that other load disturbed; and
`drive`, the timed loop the write benchmark reuses."""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from _common import Op, check_answer, describe_error, finish, log, pool_size
from _contenders import BASELINE, Contender
from _cpu_meter import CpuMeter, Load

from aiopg_resilient.testing import PostgresServer

DISTURBED = 0.10  # a round is disturbed if others took more than this share of the machine
MIN_CLEAN_ROUNDS = 3  # make-up rounds are run for cells with fewer undisturbed rounds...
MAX_MAKEUP_PER_CELL = 3  # ...at most this many per cell...
MAX_MAKEUP_ROUNDS = 40  # ...and in all, within --makeup-budget seconds


@dataclass
class Throughput:
    key: str
    contender: str
    concurrency: int
    connections: int
    seconds: float
    ops: int
    ops_per_s: float
    """Median of the rounds' rates (undisturbed rounds only, if at least two)."""
    pooled_ops_per_s: float
    """All rounds' operations over all rounds' seconds."""
    round_ops_per_s: list[float]
    rounds_used: int
    rounds_disturbed: int
    """Rounds during which other processes or the hypervisor took more than DISTURBED of
    the machine."""
    max_foreign_load: float | None
    max_steal: float | None
    errors: int
    first_error: str | None
    tls: str
    ratio_vs_psycopg_pool: float | None = None


async def drive(
    op: Op,
    concurrency: int,
    warmup: float,
    seconds: float,
    check: Callable[[Any], None] | None = check_answer,
) -> tuple[int, float, int, str | None]:
    """Run *concurrency* tasks calling *op* back to back; count completions in the window
    [warmup, warmup + seconds]; *check* vets each result (raising counts as an error).
    Returns (ops, elapsed, errors, first error)."""
    done = 0
    errors = 0
    first_error: str | None = None
    stop = False

    async def worker(i: int) -> None:
        nonlocal done, errors, first_error
        while not stop:
            try:
                value = await op(i)
                if check is not None:
                    check(value)
            except Exception as exc:
                errors += 1
                if first_error is None:
                    first_error = describe_error(exc)
                await asyncio.sleep(0.01)  # never spin on a persistent error
            else:
                done += 1

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        c0, t0 = done, time.perf_counter()
        await asyncio.sleep(seconds)
        c1, t1 = done, time.perf_counter()
    finally:
        stop = True
        await finish(tasks)
    return c1 - c0, t1 - t0, errors, first_error


@dataclass
class _Sample:
    ops: int
    elapsed: float
    errors: int
    first_error: str | None
    tls: str
    load: Load | None

    @property
    def rate(self) -> float:
        return self.ops / self.elapsed

    @property
    def disturbed(self) -> bool:
        return self.load is not None and (
            self.load.foreign > DISTURBED or self.load.steal > DISTURBED
        )


async def bench_throughput(
    pg: PostgresServer,
    contenders: Sequence[Contender],
    concurrencies: Sequence[int],
    seconds: float,
    warmup: float,
    rounds: int,
    makeup_budget: float,
) -> list[Throughput]:
    """Each cell (contender, concurrency) is measured for *seconds* in total, split over
    *rounds* interleaved rounds (every other round in reverse order), so that a drift of
    the machine during the run spreads over every contender instead of biasing one.
    Cells with fewer than MIN_CLEAN_ROUNDS rounds undisturbed by other load on the machine
    get make-up rounds, within *makeup_budget* seconds. A cell's rate is the median of its
    undisturbed rounds if there are at least two, else of all its rounds."""
    samples: dict[tuple[str, int], list[_Sample]] = {}
    per_round = seconds / rounds
    meter = CpuMeter(pg)

    async def cell(c: Contender, concurrency: int, label: str) -> None:
        size = pool_size(concurrency)
        gc.collect()
        async with c.open(pg, size) as subject:
            ssl_on, version, cipher = await subject.tls()
            if not ssl_on:
                raise RuntimeError(f"{c.name}: the session is not over TLS")
            meter.start()
            ops, elapsed, errors, first_error = await drive(
                subject.op, concurrency, warmup, per_round
            )
            load = meter.stop()
        sample = _Sample(ops, elapsed, errors, first_error, f"{version} {cipher}", load)
        log.info(
            "throughput %s %-26s c=%-2d conns=%d: %8.0f ops/s (%d errors; other load %s, steal %s)",
            label,
            c.name,
            concurrency,
            size,
            sample.rate,
            errors,
            "?" if load is None else f"{load.foreign:.0%}",
            "?" if load is None else f"{load.steal:.0%}",
        )
        samples.setdefault((c.key, concurrency), []).append(sample)

    for rnd in range(rounds):
        order = list(contenders) if rnd % 2 == 0 else list(contenders)[::-1]
        for concurrency in concurrencies:
            for c in order:
                await cell(c, concurrency, f"round {rnd + 1}/{rounds}")
    # Make-up rounds for cells that other load disturbed, within a time budget.
    wanted = min(rounds, MIN_CLEAN_ROUNDS)
    deadline = time.monotonic() + makeup_budget
    extra = 0
    while time.monotonic() < deadline and extra < MAX_MAKEUP_ROUNDS:
        short = [
            (sum(not r.disturbed for r in runs), len(runs), key)
            for key, runs in samples.items()
            if sum(not r.disturbed for r in runs) < wanted
            and len(runs) < rounds + MAX_MAKEUP_PER_CELL
        ]
        if not short:
            break
        _, _, (key, concurrency) = min(short)
        extra += 1
        c = next(x for x in contenders if x.key == key)
        await cell(c, concurrency, f"make-up {extra}")
    results: list[Throughput] = []
    for concurrency in concurrencies:
        for c in contenders:
            runs = samples[(c.key, concurrency)]
            clean = [r for r in runs if not r.disturbed]
            used = clean if len(clean) >= min(2, len(runs)) else runs
            ops = sum(r.ops for r in runs)
            elapsed = sum(r.elapsed for r in runs)
            loads = [r.load for r in runs if r.load is not None]
            results.append(
                Throughput(
                    key=c.key,
                    contender=c.name,
                    concurrency=concurrency,
                    connections=pool_size(concurrency),
                    seconds=round(elapsed, 3),
                    ops=ops,
                    ops_per_s=round(statistics.median(r.rate for r in used), 1),
                    pooled_ops_per_s=round(ops / elapsed, 1),
                    round_ops_per_s=[round(r.rate, 1) for r in runs],
                    rounds_used=len(used),
                    rounds_disturbed=len(runs) - len(clean),
                    max_foreign_load=round(max(x.foreign for x in loads), 3) if loads else None,
                    max_steal=round(max(x.steal for x in loads), 3) if loads else None,
                    errors=sum(r.errors for r in runs),
                    first_error=next((r.first_error for r in runs if r.first_error), None),
                    tls=runs[0].tls,
                )
            )
    for r in results:
        base = next(
            (b for b in results if b.key == BASELINE and b.concurrency == r.concurrency), None
        )
        if base is not None and base.ops_per_s > 0:
            r.ratio_vs_psycopg_pool = round(r.ops_per_s / base.ops_per_s, 3)
    return results
