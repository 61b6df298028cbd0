"""Write cost: one row per operation, each way a contender offers (`WRITE_MODES`: one
INSERT, a BEGIN/INSERT/COMMIT block, ours also ``idempotent=True``), timed with the read
benchmark's loop; afterwards the table must hold exactly the rows acknowledged."""

from __future__ import annotations

import gc
import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from _common import WRITE_MODES, WRITE_TABLE, WriteOp, log, pool_size
from _contenders import BASELINE, Contender
from _throughput import drive

from aiopg_resilient.testing import PostgresServer


@dataclass
class WriteCost:
    key: str
    contender: str
    mode: str
    """A key of WRITE_MODES."""
    concurrency: int
    connections: int
    ops_per_s: float
    """Median of the rounds."""
    round_ops_per_s: list[float]
    errors: int
    first_error: str | None
    rows_match: bool
    """Every round: the rows in the table are exactly the writes acknowledged."""
    ratio_vs_psycopg_pool: float | None = None
    """Over psycopg_pool's (b) one INSERT at the same concurrency."""


class _Counting:
    """A write as a read-loop `Op` with a unique key per call, counting acknowledgements."""

    def __init__(self, write: WriteOp, prefix: str) -> None:
        self.write = write
        self.prefix = prefix
        self.keys = itertools.count()
        self.acked = 0

    async def __call__(self, i: int) -> Any:
        await self.write(i, f"{self.prefix}{next(self.keys)}")
        self.acked += 1


async def _count_rows(pg: PostgresServer) -> int:
    return int((await pg.execute(f"SELECT count(*) FROM {WRITE_TABLE}"))[0][0])


async def bench_writes(
    pg: PostgresServer,
    contenders: Sequence[Contender],
    concurrencies: Sequence[int],
    seconds: float,
    warmup: float,
    rounds: int,
) -> list[WriteCost]:
    """Each cell (contender, mode, concurrency) runs *rounds* windows of *seconds* (every
    other round in reverse order); its rate is the median of the rounds."""
    await pg.execute(f"CREATE TABLE IF NOT EXISTS {WRITE_TABLE} (k text, v int)")
    runs: dict[tuple[str, str, int], list[tuple[float, int, str | None, bool]]] = {}
    for rnd in range(rounds):
        order = list(contenders) if rnd % 2 == 0 else list(contenders)[::-1]
        for concurrency in concurrencies:
            for c in order:
                gc.collect()
                async with c.open(pg, pool_size(concurrency)) as subject:
                    for mode, write in subject.writes.items():
                        await pg.execute(f"TRUNCATE {WRITE_TABLE}")
                        counting = _Counting(write, f"{c.key}{mode[0]}{rnd}-")
                        ops, elapsed, errors, first = await drive(
                            counting, concurrency, warmup, seconds / rounds, check=None
                        )
                        match = await _count_rows(pg) == counting.acked
                        runs.setdefault((c.key, mode, concurrency), []).append(
                            (ops / elapsed, errors, first, match)
                        )
                        log.info(
                            "writes round %d/%d %-24s %-11s c=%-2d: %7.0f ops/s, %d errors%s",
                            rnd + 1,
                            rounds,
                            c.name,
                            mode,
                            concurrency,
                            ops / elapsed,
                            errors,
                            "" if match else ", ROWS != ACKNOWLEDGED WRITES",
                        )
    await pg.execute(f"TRUNCATE {WRITE_TABLE}")
    results = []
    for concurrency in concurrencies:
        for c in contenders:
            for mode in WRITE_MODES:
                cell = runs.get((c.key, mode, concurrency))
                if not cell:
                    continue
                results.append(
                    WriteCost(
                        key=c.key,
                        contender=c.name,
                        mode=mode,
                        concurrency=concurrency,
                        connections=pool_size(concurrency),
                        ops_per_s=round(statistics.median(r[0] for r in cell), 1),
                        round_ops_per_s=[round(r[0], 1) for r in cell],
                        errors=sum(r[1] for r in cell),
                        first_error=next((r[2] for r in cell if r[2]), None),
                        rows_match=all(r[3] for r in cell),
                    )
                )
    for r in results:
        base = next(
            (
                b
                for b in results
                if b.key == BASELINE and b.mode == "insert" and b.concurrency == r.concurrency
            ),
            None,
        )
        if base is not None and base.ops_per_s > 0:
            r.ratio_vs_psycopg_pool = round(r.ops_per_s / base.ops_per_s, 3)
    return results
