"""Recovery part of bench_reads.py: one reader task per pool while the server restarts
(``-m fast``) or crashes (``stop -m immediate``, 2 s down, start); times "server ready ->
first successful read" and counts the errors the reader saw."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg_pool
from _common import QUERY, SETUP_TIMEOUT, describe_error, finish, log
from _cpu_meter import CpuMeter

from aiopg_resilient import ResilientPool
from aiopg_resilient.testing import PostgresServer

RECOVERY_CAP = 20.0  # give up on a recovery this long after the server is ready
RECOVERY_TAIL = 1.0  # keep reading this long after the first success, counting errors
RECOVERY_WARMUP = 0.3  # reads before the fault

Read = Callable[[], Awaitable[Any]]


@dataclass
class Recovery:
    contender: str
    fault: str
    repetition: int
    fault_seconds: float
    """From the fault's start (restart/stop called) to the server being ready again."""
    recovery: float | None
    """From restart()/start() returning (server ready) to the end of the first read that
    succeeded after it; None if none did within RECOVERY_CAP."""
    recovery_from_ready_file: float | None
    """Same, from the moment the postmaster wrote "ready" into postmaster.pid (local
    backend only): a check on the resolution of the first number."""
    errors: int
    """Errors the reader saw from the fault's start to the end of the observation."""
    error_kinds: dict[str, int]
    longest_gap: float
    """Longest time between two successful reads around the fault: the outage the
    application saw."""
    longest_call: float
    """Longest single read call that ended after the fault started."""
    reads_ok: int
    foreign_load: float | None
    """Share of the machine other processes used from the fault to the end (CpuMeter)."""


@dataclass
class _Reader:
    stop: bool = False
    successes: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    calls: list[tuple[float, float]] = field(default_factory=list)  # (end, duration) > 10 ms
    ready_at: float | None = None
    recovered: asyncio.Event = field(default_factory=asyncio.Event)


async def _read_loop(read: Read, st: _Reader) -> None:
    """One task, reading as fast as it can; errors are swallowed and counted."""
    while not st.stop:
        start = time.monotonic()
        try:
            await read()
        except Exception as exc:  # a user's "retry on OperationalError" loop
            end = time.monotonic()
            st.errors.append(end)
            if len(st.kinds) < 20:
                st.kinds[describe_error(exc)] += 1
            else:
                st.kinds["(other)"] += 1
        else:
            end = time.monotonic()
            st.successes.append(end)
            if st.ready_at is not None and end >= st.ready_at:
                st.recovered.set()
        if end - start > 0.01:
            st.calls.append((end, end - start))


@contextlib.asynccontextmanager
async def reader_resilient(pg: PostgresServer) -> AsyncIterator[Read]:
    async with ResilientPool(pg.dsn, name="bench-recovery") as pool:

        async def read() -> Any:
            return await pool.fetchval(QUERY)

        yield read


@contextlib.asynccontextmanager
async def reader_psycopg_pool(pg: PostgresServer) -> AsyncIterator[Read]:
    pool = psycopg_pool.AsyncConnectionPool(pg.dsn, open=False)
    await pool.open(wait=True, timeout=SETUP_TIMEOUT)
    try:

        async def read() -> None:
            async with pool.connection() as conn:
                await conn.execute(QUERY)

        yield read
    finally:
        await pool.close()


RECOVERY_CONTENDERS: tuple[
    tuple[str, Callable[[PostgresServer], contextlib.AbstractAsyncContextManager[Read]]], ...
] = (
    ("aiopg_resilient", reader_resilient),
    ("psycopg_pool", reader_psycopg_pool),
)


def _ready_file_time(pg: PostgresServer) -> float | None:
    """Wall-clock time the postmaster last wrote postmaster.pid (its "ready" line)."""
    with contextlib.suppress(Exception):
        data_dir = pg.data_dir
        if data_dir is not None:
            return os.stat(Path(data_dir) / "postmaster.pid").st_mtime
    return None


async def _fast_restart(pg: PostgresServer) -> None:
    await pg.restart("fast")


async def _immediate_down_2s(pg: PostgresServer) -> None:
    await pg.stop("immediate")
    await asyncio.sleep(2.0)
    await pg.start()


FAULTS: dict[str, Callable[[PostgresServer], Awaitable[None]]] = {
    "restart -m fast": _fast_restart,
    "stop -m immediate, 2 s down, start": _immediate_down_2s,
}


async def measure_recovery(
    pg: PostgresServer,
    name: str,
    opener: Callable[[PostgresServer], contextlib.AbstractAsyncContextManager[Read]],
    fault: str,
    repetition: int,
) -> Recovery:
    st = _Reader()
    async with opener(pg) as read:
        task = asyncio.create_task(_read_loop(read, st))
        try:
            await asyncio.sleep(RECOVERY_WARMUP)
            if not st.successes:
                raise RuntimeError(f"{name}: no successful read before the fault")
            meter = CpuMeter(pg)
            meter.start()
            t_fault = time.monotonic()
            try:
                await FAULTS[fault](pg)
            finally:
                t_ready = st.ready_at = time.monotonic()
                wall_ready = time.time()
            ready_file = _ready_file_time(pg)
            # Wait (bounded) for the first success after the server is ready, then keep
            # reading a little to count late errors (stale connections used later).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(st.recovered.wait(), RECOVERY_CAP)
            await asyncio.sleep(RECOVERY_TAIL)
            load = meter.stop()
        finally:
            st.stop = True
            await finish([task], timeout=RECOVERY_CAP)

    first_ok = next((s for s in st.successes if s >= t_ready), None)
    recovery = None if first_ok is None else first_ok - t_ready
    recovery_file = None
    if ready_file is not None:
        t_file = t_ready - (wall_ready - ready_file)  # the same instant on the monotonic clock
        first_ok_file = next((s for s in st.successes if s >= t_file), None)
        if first_ok_file is not None and wall_ready - ready_file < 60:
            recovery_file = first_ok_file - t_file
    # The outage the application saw: longest gap between successes around the fault.
    around = [s for s in st.successes if s < t_fault][-1:] + [
        s for s in st.successes if s >= t_fault
    ]
    gaps = [b - a for a, b in itertools.pairwise(around)]
    errors_in = [e for e in st.errors if e >= t_fault]
    before = len(st.errors) - len(errors_in)
    if before:
        log.warning("%s: %d error(s) before the fault", name, before)
    return Recovery(
        contender=name,
        fault=fault,
        repetition=repetition,
        fault_seconds=round(t_ready - t_fault, 4),
        recovery=None if recovery is None else round(recovery, 4),
        recovery_from_ready_file=None if recovery_file is None else round(recovery_file, 4),
        errors=len(errors_in),
        error_kinds=dict(st.kinds),
        longest_gap=round(max(gaps, default=0.0), 4),
        longest_call=round(max((d for e, d in st.calls if e >= t_fault), default=0.0), 4),
        reads_ok=len(st.successes),
        foreign_load=None if load is None else round(load.foreign, 3),
    )


async def bench_recovery(pg: PostgresServer, fast_reps: int, immediate_reps: int) -> list[Recovery]:
    results: list[Recovery] = []
    plan = [("restart -m fast", fast_reps), ("stop -m immediate, 2 s down, start", immediate_reps)]
    for fault, reps in plan:
        for rep in range(1, reps + 1):
            # Alternate who goes first, so neither always meets a freshly restarted server.
            order = RECOVERY_CONTENDERS if rep % 2 else RECOVERY_CONTENDERS[::-1]
            for name, opener in order:
                gc.collect()
                r = await measure_recovery(pg, name, opener, fault, rep)
                log.info(
                    "recovery %-16s %-36s #%d: ready->ok %s s, %d errors, gap %.3f s",
                    name,
                    fault,
                    rep,
                    "n/a" if r.recovery is None else f"{r.recovery:.3f}",
                    r.errors,
                    r.longest_gap,
                )
                results.append(r)
                await asyncio.sleep(0.2)
    return results
