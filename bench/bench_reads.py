#!/usr/bin/env python
"""Read benchmarks of aiopg_resilient against psycopg_pool, raw psycopg and asyncpg.

One run, one throwaway PostgreSQL 15 (``ssl=on``) started by this script, every client over
TLS (``sslmode=verify-full``) to 127.0.0.1:

1. Throughput of ``SELECT 1`` at concurrency 1 and 32 (asyncio tasks), per contender:
   a. aiopg_resilient  ``await pool.fetchval("SELECT 1")`` (defaults: heartbeat on)
   b. psycopg_pool     ``async with pool.connection() as conn: await conn.execute(...)``
   c. psycopg_pool autocommit (same with ``kwargs={"autocommit": True}``)
   d. raw held psycopg ``AsyncConnection`` (autocommit)
   e. asyncpg pool     ``await pool.fetchval("SELECT 1")``
   Pools hold 1 connection at concurrency 1 and 8 (min = max) at concurrency 32. Each cell
   is timed over several interleaved rounds; its rate is the median of the rounds that
   other load on the machine did not disturb (measured through /proc).
2. Recovery after ``restart -m fast`` (5 times) and after ``stop -m immediate``, 2 s down,
   ``start`` (once), for aiopg_resilient and psycopg_pool with default settings: one reader
   task reads as fast as it can; we time "server ready -> first successful read" and count
   the errors the reader saw.

Usage::

    .venv/bin/python bench/bench_reads.py [--seconds N] [--json PATH]

Results go to stdout as markdown tables; progress to stderr. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import itertools
import json
import logging
import os
import platform
import ssl
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import psycopg_pool

import aiopg_resilient
from aiopg_resilient import ResilientPool
from aiopg_resilient.testing import PostgresServer

QUERY = "SELECT 1"
TLS_QUERY = "SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
POOL_SIZE_AT_32 = 8
SETUP_TIMEOUT = 30.0  # opening a contender (connections made, pool full)
FINISH_TIMEOUT = 10.0  # stopping worker tasks once a measurement is over
RECOVERY_CAP = 20.0  # give up on a recovery this long after the server is ready
RECOVERY_TAIL = 1.0  # keep reading this long after the first success, counting errors
RECOVERY_WARMUP = 0.3  # reads before the fault
DISTURBED = 0.10  # a round is disturbed if others took more than this share of the machine
MIN_CLEAN_ROUNDS = 3  # make-up rounds are run for cells with fewer undisturbed rounds...
MAX_MAKEUP_PER_CELL = 3  # ...at most this many per cell...
MAX_MAKEUP_ROUNDS = 40  # ...and in all, within --makeup-budget seconds

log = logging.getLogger("bench")

Op = Callable[[int], Awaitable[Any]]  # op(task_index)
Read = Callable[[], Awaitable[Any]]


# --- contenders (throughput) ----------------------------------------------------------------


@dataclass
class Subject:
    """An opened contender: the operation to time and a probe of its TLS session."""

    op: Op
    tls: Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Contender:
    key: str
    name: str
    describe: str
    open: Callable[[PostgresServer, int], contextlib.AbstractAsyncContextManager[Subject]]


async def _bounded(what: str, cond: Callable[[], bool], timeout: float = SETUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def open_resilient(pg: PostgresServer, size: int) -> AsyncIterator[Subject]:
    async with ResilientPool(pg.dsn, min_size=size, max_size=size, name="bench") as pool:
        await _bounded(f"ResilientPool size {size}", lambda: pool.stats.size == size)

        async def op(_: int) -> Any:
            return await pool.fetchval(QUERY)

        yield Subject(op=op, tls=lambda: pool.fetchone(TLS_QUERY))


def _psycopg_pool_subject(pool: psycopg_pool.AsyncConnectionPool[Any]) -> Subject:
    async def op(_: int) -> None:
        async with pool.connection() as conn:
            await conn.execute(QUERY)

    async def tls() -> Any:
        async with pool.connection() as conn:
            cur = await conn.execute(TLS_QUERY)
            return await cur.fetchone()

    return Subject(op=op, tls=tls)


@contextlib.asynccontextmanager
async def open_psycopg_pool(pg: PostgresServer, size: int) -> AsyncIterator[Subject]:
    pool = psycopg_pool.AsyncConnectionPool(pg.dsn, min_size=size, max_size=size, open=False)
    await pool.open(wait=True, timeout=SETUP_TIMEOUT)
    try:
        yield _psycopg_pool_subject(pool)
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def open_psycopg_pool_autocommit(pg: PostgresServer, size: int) -> AsyncIterator[Subject]:
    pool = psycopg_pool.AsyncConnectionPool(
        pg.dsn, min_size=size, max_size=size, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True, timeout=SETUP_TIMEOUT)
    try:
        yield _psycopg_pool_subject(pool)
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def open_raw(pg: PostgresServer, size: int) -> AsyncIterator[Subject]:
    conns: list[psycopg.AsyncConnection[Any]] = []
    try:
        for _ in range(size):
            conns.append(await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True))
        if size == 1:
            # One task, one connection: nothing to serialise.
            conn = conns[0]

            async def op(i: int) -> None:
                await conn.execute(QUERY)

        else:
            # Task i always uses connection i % size, behind that connection's lock
            # (with 32 tasks and 8 connections: 4 tasks share each connection).
            locks = [asyncio.Lock() for _ in conns]

            async def op(i: int) -> None:
                k = i % size
                async with locks[k]:
                    await conns[k].execute(QUERY)

        async def tls() -> Any:
            cur = await conns[0].execute(TLS_QUERY)
            return await cur.fetchone()

        yield Subject(op=op, tls=tls)
    finally:
        for conn in conns:
            await conn.close()


def _asyncpg_ssl(pg: PostgresServer) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pg.ca_path))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@contextlib.asynccontextmanager
async def open_asyncpg(pg: PostgresServer, size: int) -> AsyncIterator[Subject]:
    pool = await asyncpg.create_pool(
        host=pg.host,
        port=pg.port,
        user=pg.user,
        password=pg.password,
        database=pg.dbname,
        ssl=_asyncpg_ssl(pg),
        min_size=size,
        max_size=size,
        timeout=SETUP_TIMEOUT,
    )
    try:

        async def op(_: int) -> Any:
            return await pool.fetchval(QUERY)

        async def tls() -> Any:
            row = await pool.fetchrow(TLS_QUERY)
            return None if row is None else tuple(row)

        yield Subject(op=op, tls=tls)
    finally:
        await asyncio.wait_for(pool.close(), FINISH_TIMEOUT)


CONTENDERS: tuple[Contender, ...] = (
    Contender(
        "a",
        "aiopg_resilient",
        'ResilientPool(min=max=n), defaults (heartbeat on): await pool.fetchval("SELECT 1")',
        open_resilient,
    ),
    Contender(
        "b",
        "psycopg_pool",
        "AsyncConnectionPool(min=max=n), default kwargs (not autocommit): "
        'async with pool.connection() as conn: await conn.execute("SELECT 1")',
        open_psycopg_pool,
    ),
    Contender(
        "c",
        "psycopg_pool autocommit",
        'same as b with kwargs={"autocommit": True}',
        open_psycopg_pool_autocommit,
    ),
    Contender(
        "d",
        "raw psycopg (held)",
        "n held AsyncConnection(autocommit); at 32 tasks task i uses connection i % 8 "
        "behind an asyncio.Lock per connection",
        open_raw,
    ),
    Contender(
        "e",
        "asyncpg pool",
        'asyncpg.create_pool(min=max=n, ssl=SSLContext): await pool.fetchval("SELECT 1")',
        open_asyncpg,
    ),
)
BASELINE = "b"


# --- throughput -----------------------------------------------------------------------------


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


async def _finish(tasks: Sequence[asyncio.Task[Any]], timeout: float = FINISH_TIMEOUT) -> None:
    """Wait (bounded) for tasks told to stop; cancel stragglers; retrieve every outcome."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        log.warning("%d task(s) did not stop within %.0f s; cancelled", len(pending), timeout)
        await asyncio.wait(pending, timeout=timeout)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("worker task failed: %r", task.exception())


@dataclass
class Load:
    """What else the machine did during a measurement (Linux /proc; zeros elsewhere)."""

    steal: float = 0.0
    """Share of the machine's CPU time the hypervisor gave to other guests."""
    foreign: float = 0.0
    """Share of the machine's CPU time used by processes other than this one and the
    PostgreSQL server (e.g. a test suite running next to the benchmark)."""


def _proc_times(pid: int | str) -> tuple[int, int, int] | None:
    """(ppid, own utime + stime, reaped children's cutime + cstime), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


class CpuMeter:
    """Splits the machine's CPU time over a window into ours (this process and the
    PostgreSQL server with its backends), the hypervisor's steal, and everyone else's.

    Ours is the CPU time of this process, of the postmaster and of its live children,
    counting reaped children too (a child's time passes to its parent's cutime/cstime
    when it is reaped; the postmaster is our child): the sum is conserved across
    backends exiting and across server restarts, so its difference is exact.
    """

    def __init__(self, pg: PostgresServer) -> None:
        self._pg = pg
        self._start: tuple[list[int], int] | None = None

    @staticmethod
    def _machine() -> list[int] | None:
        try:
            with open("/proc/stat") as f:
                return [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None

    def _postmaster(self) -> int | None:
        with contextlib.suppress(Exception):
            data_dir = self._pg.data_dir
            if data_dir is not None:
                return int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
        return None

    def _ours(self) -> int | None:
        me = _proc_times(os.getpid())
        if me is None:
            return None
        total = me[1] + me[2]
        postmaster = self._postmaster()
        if postmaster is None:
            return total
        with contextlib.suppress(OSError):
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                info = _proc_times(entry.name)
                if info is None:
                    continue
                if int(entry.name) == postmaster and info[0] == os.getpid():
                    total += info[1] + info[2]
                elif info[0] == postmaster:
                    total += info[1]
        return total

    def start(self) -> None:
        machine, ours = self._machine(), self._ours()
        self._start = None if machine is None or ours is None else (machine, ours)

    def stop(self) -> Load | None:
        machine, ours = self._machine(), self._ours()
        if self._start is None or machine is None or ours is None:
            return None
        m0, ours0 = self._start
        d = [b - a for a, b in zip(m0, machine, strict=True)]
        total = sum(d)
        if total <= 0:
            return None
        busy = d[0] + d[1] + d[2]  # user + nice + system (irq/softirq time is nobody's)
        return Load(steal=d[7] / total, foreign=max(0, busy - (ours - ours0)) / total)


def _describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


async def drive(
    op: Op, concurrency: int, warmup: float, seconds: float
) -> tuple[int, float, int, str | None]:
    """Run *concurrency* tasks calling *op* back to back; count completions in the window
    [warmup, warmup + seconds]. Returns (ops, elapsed, errors, first error)."""
    done = 0
    errors = 0
    first_error: str | None = None
    stop = False

    async def worker(i: int) -> None:
        nonlocal done, errors, first_error
        while not stop:
            try:
                await op(i)
            except Exception as exc:
                errors += 1
                if first_error is None:
                    first_error = _describe_error(exc)
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
        await _finish(tasks)
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
        size = 1 if concurrency == 1 else POOL_SIZE_AT_32
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
                    connections=1 if concurrency == 1 else POOL_SIZE_AT_32,
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


# --- recovery -------------------------------------------------------------------------------


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
                st.kinds[_describe_error(exc)] += 1
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
            await _finish([task], timeout=RECOVERY_CAP)

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


# --- report ---------------------------------------------------------------------------------


def _fmt_s(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def throughput_table(results: Sequence[Throughput], concurrencies: Sequence[int]) -> str:
    head = ["contender"]
    for c in concurrencies:
        head += [f"ops/s @{c}", f"vs psycopg_pool @{c}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen: list[str] = []
    for r in results:
        if r.key not in seen:
            seen.append(r.key)
    for key in seen:
        row = [next(r.contender for r in results if r.key == key)]
        row[0] = f"{key}. {row[0]}"
        for c in concurrencies:
            cell = next((x for x in results if x.key == key and x.concurrency == c), None)
            if cell is None:
                row += ["—", "—"]
                continue
            ops = f"{cell.ops_per_s:,.0f}"
            if len(cell.round_ops_per_s) > 1:
                ops += f" ({min(cell.round_ops_per_s):,.0f}-{max(cell.round_ops_per_s):,.0f})"
            if cell.rounds_disturbed:
                ops += " " + "*" * cell.rounds_disturbed
            if cell.errors:
                ops += f", {cell.errors} errors"
            ratio = (
                "—" if cell.ratio_vs_psycopg_pool is None else f"{cell.ratio_vs_psycopg_pool:.2f}"
            )
            row += [ops, ratio]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def recovery_table(results: Sequence[Recovery]) -> str:
    head = [
        "fault",
        "contender",
        "runs",
        "ready → first ok: median",
        "max",
        "errors seen: median",
        "max",
        "total",
        "longest gap between ok reads: median",
        "ready (postmaster.pid) → first ok: median",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys: list[tuple[str, str]] = []
    for r in results:
        if (r.fault, r.contender) not in keys:
            keys.append((r.fault, r.contender))
    for fault, name in keys:
        runs = [r for r in results if r.fault == fault and r.contender == name]
        recs = [r.recovery for r in runs if r.recovery is not None]
        failed = len(runs) - len(recs)
        errs = [r.errors for r in runs]
        files = [r.recovery_from_ready_file for r in runs if r.recovery_from_ready_file is not None]
        row = [
            fault,
            name,
            str(len(runs)),
            (_fmt_s(statistics.median(recs)) if recs else "—")
            + (f" ({failed} never)" if failed else ""),
            _fmt_s(max(recs)) if recs else "—",
            f"{statistics.median(errs):g}",
            str(max(errs)),
            str(sum(errs)),
            _fmt_s(statistics.median(r.longest_gap for r in runs)),
            _fmt_s(statistics.median(files)) if files else "—",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def error_kinds_text(results: Sequence[Recovery]) -> str:
    merged: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for r in results:
        merged[r.contender].update(r.error_kinds)
    lines = []
    for name, kinds in merged.items():
        for kind, n in kinds.most_common(6):
            lines.append(f"- {name}: {n} x `{kind}`")
    return "\n".join(lines) if lines else "- none"


# --- main -----------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "aiopg_resilient": aiopg_resilient.__version__,
        "psycopg": psycopg.__version__,
        "psycopg_impl": psycopg.pq.__impl__,
        "libpq": str(psycopg.pq.version()),
        "psycopg_pool": psycopg_pool.__version__,
        "asyncpg": asyncpg.__version__,
        "event_loop": type(asyncio.get_event_loop_policy()).__name__,
    }


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "versions": _versions(),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds": args.rounds,
    }
    keys = set(args.only) if args.only else {c.key for c in CONTENDERS}
    contenders = [c for c in CONTENDERS if c.key in keys]
    started = time.monotonic()
    async with PostgresServer(ssl=True) as pg:
        rows = await pg.execute("SELECT current_setting('server_version'), current_setting('ssl')")
        meta["server_version"], meta["server_ssl"] = rows[0]
        meta["backend"] = pg.backend
        log.info("PostgreSQL %s (ssl=%s) on %s:%d", rows[0][0], rows[0][1], pg.host, pg.port)
        throughput: list[Throughput] = []
        if not args.skip_throughput and contenders:
            throughput = await bench_throughput(
                pg,
                contenders,
                args.concurrency,
                args.seconds,
                args.warmup,
                args.rounds,
                args.makeup_budget,
            )
        recovery: list[Recovery] = []
        if not args.skip_recovery:
            recovery = await bench_recovery(pg, args.fast_reps, args.immediate_reps)
    meta["elapsed"] = round(time.monotonic() - started, 1)
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    meta["leftover_tasks"] = [repr(t) for t in leftovers]
    if leftovers:
        log.warning("%d task(s) still pending at the end: %s", len(leftovers), leftovers)
    return {
        "meta": meta,
        "contenders": {c.key: {"name": c.name, "what": c.describe} for c in contenders},
        "throughput": [asdict(r) for r in throughput],
        "recovery": [asdict(r) for r in recovery],
        "_objects": (throughput, recovery),
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    throughput, recovery = result["_objects"]
    meta = result["meta"]
    v = meta["versions"]
    out = [
        "# aiopg_resilient read benchmarks",
        "",
        f"PostgreSQL {meta['server_version']} (ssl={meta['server_ssl']}, "
        f"{meta['backend']} backend), "
        f"all clients over TLS to 127.0.0.1; Python {v['python']} ({v['event_loop']}), "
        f"{v['cpus']} CPUs; aiopg_resilient {v['aiopg_resilient']}, psycopg {v['psycopg']} "
        f"({v['psycopg_impl']}, libpq {v['libpq']}), psycopg_pool {v['psycopg_pool']}, "
        f"asyncpg {v['asyncpg']}. Total run {meta['elapsed']} s.",
    ]
    if throughput:
        tls = sorted({r.tls for r in throughput})
        steals = [r.max_steal for r in throughput if r.max_steal is not None]
        foreign = [r.max_foreign_load for r in throughput if r.max_foreign_load is not None]
        out += [
            "",
            f"## Throughput of `SELECT 1` (ops/s; {args.seconds:g} s measured per cell over "
            f"{args.rounds} interleaved round(s), each after {args.warmup:g} s of warm-up; "
            f"1 connection at concurrency 1, {POOL_SIZE_AT_32} at 32; TLS: {', '.join(tls)})",
            "",
            "Median of the rounds; in parentheses the lowest and highest round. "
            f"Each `*` marks a round during which other processes or the hypervisor took more "
            f"than {DISTURBED:.0%} of the machine; such rounds are left out of the median "
            "while two clean ones remain, and cells with fewer than "
            f"{MIN_CLEAN_ROUNDS} clean rounds got make-up rounds "
            f"(within {args.makeup_budget:g} s). "
            + (
                f"Other processes took at most {max(foreign):.0%} of the machine during a "
                f"round, the hypervisor at most {max(steals):.0%}."
                if steals and foreign
                else ""
            ),
            "",
            throughput_table(throughput, args.concurrency),
        ]
    if recovery:
        out += [
            "",
            "## Recovery (one reader task; default settings; errors swallowed and counted)",
            "",
            recovery_table(recovery),
            "",
            "Errors seen by the readers:",
            "",
            error_kinds_text(recovery),
        ]
    return "\n".join(out) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="measured seconds per throughput cell, all rounds together (3)",
    )
    p.add_argument(
        "--warmup", type=float, default=0.3, help="warm-up seconds per cell and round (0.3)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved rounds the measured seconds are split over (5)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="task counts (1 32)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=[c.key for c in CONTENDERS],
        help="throughput contenders to run",
    )
    p.add_argument(
        "--makeup-budget",
        type=float,
        default=40.0,
        help="seconds allowed for re-running rounds disturbed by other load (40; 0: none)",
    )
    p.add_argument("--fast-reps", type=int, default=5, help="restart -m fast repetitions (5)")
    p.add_argument(
        "--immediate-reps", type=int, default=1, help="stop -m immediate repetitions (1)"
    )
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-recovery", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="show the libraries' warnings")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.seconds > 60 or args.warmup < 0 or args.warmup > 30:
        p.error("--seconds must be in (0, 60] and --warmup in [0, 30]")
    if not 0 <= args.makeup_budget <= 300:
        p.error("--makeup-budget must be in [0, 300]")
    if not 1 <= args.rounds <= 20:
        p.error("--rounds must be between 1 and 20")
    if any(c < 1 or c > 1024 for c in args.concurrency):
        p.error("--concurrency must be between 1 and 1024")
    if not (0 <= args.fast_reps <= 50 and 0 <= args.immediate_reps <= 10):
        p.error("--fast-reps must be in [0, 50] and --immediate-reps in [0, 10]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    # The pools log every lost connection at WARNING: expected here, and counted anyway.
    level = logging.WARNING if args.verbose else logging.ERROR
    root.setLevel(level)
    logging.getLogger("psycopg").setLevel(level)  # psycopg pins its logger at WARNING
    log.setLevel(logging.INFO)
    result = asyncio.run(amain(args))
    text = report(result, args)
    sys.stdout.write(text)
    sys.stdout.flush()
    if args.json is not None:
        data = {k: v for k, v in result.items() if not k.startswith("_")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        log.info("results written to %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
