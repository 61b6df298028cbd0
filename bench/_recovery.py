"""Recovery and errors under faults: reader tasks read through a contender (``SELECT 1``,
answers checked) while a fault from `_faults` hits; we time "server ready -> first
successful read" and count the errors the readers (the application) saw.

A reader is the loop an application writes: call, and on an error count it, wait
ERROR_PAUSE and go on. Contenders face a fault one at a time (alternating who goes first),
or all at once against the same fault (``together``: faster, for smoke runs)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _common import ERROR_PAUSE, Op, check_answer, describe_error, finish, log
from _contenders import Contender
from _cpu_meter import CpuMeter
from _faults import FAULTS, Fault, ProxyTarget

from aiopg_resilient.testing import ChaosProxy, PostgresServer


@dataclass(frozen=True)
class FaultPlan:
    reps: dict[str, int]
    """Repetitions per fault key (FAULTS), in this order."""
    readers: int = 1
    """Reader tasks per contender."""
    size: int = 4
    """Connections each contender holds (min = max)."""
    warmup: float = 0.3
    """Reads before the fault."""
    tail: float = 1.0
    """Keep reading this long after every contender's first success, counting late errors
    (stale pooled connections used later)."""
    down: float = 2.0
    """How long a crashed server stays down."""
    cap: float = 20.0
    """Give up on a recovery this long after the server is ready."""
    together: bool = False


@dataclass
class Recovery:
    key: str
    contender: str
    fault: str
    fault_key: str
    """A key of FAULTS."""
    repetition: int
    together: bool
    fault_seconds: float
    """From the fault's start to its end (the server ready again, or the cut done)."""
    recovery: float | None
    """From the fault's end (server ready) to the end of the first read that succeeded
    after it; None if none did within the cap."""
    recovery_from_ready_file: float | None
    """Same, from the moment the postmaster wrote "ready" into postmaster.pid (restart and
    crash, local backend only): a check on the resolution of the first number."""
    errors: int
    """Errors the readers saw from the fault's start to the end of the observation."""
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


async def _read_loop(op: Op, i: int, st: _Reader) -> None:
    """One reader task: reads back to back; an error is counted, then ERROR_PAUSE."""
    while not st.stop:
        start = time.monotonic()
        try:
            check_answer(await op(i))
        except Exception as exc:  # a user's "catch, log, retry" loop
            end = time.monotonic()
            st.errors.append(end)
            st.kinds[describe_error(exc) if len(st.kinds) < 20 else "(other)"] += 1
            await asyncio.sleep(ERROR_PAUSE)
        else:
            end = time.monotonic()
            st.successes.append(end)
            if st.ready_at is not None and end >= st.ready_at:
                st.recovered.set()
        if end - start > 0.01:
            st.calls.append((end, end - start))


def _ready_file_time(pg: PostgresServer) -> float | None:
    """Wall-clock time the postmaster last wrote postmaster.pid (its "ready" line)."""
    with contextlib.suppress(Exception):
        data_dir = pg.data_dir
        if data_dir is not None:
            return os.stat(Path(data_dir) / "postmaster.pid").st_mtime
    return None


def _summary(
    c: Contender,
    st: _Reader,
    fault: Fault,
    repetition: int,
    plan: FaultPlan,
    t_fault: float,
    t_ready: float,
    t_file: float | None,
    load: float | None,
) -> Recovery:
    def first_ok_after(t: float) -> float | None:
        first = next((s for s in st.successes if s >= t), None)
        return None if first is None else round(first - t, 4)

    # The outage the application saw: longest gap between successes around the fault.
    around = [s for s in st.successes if s < t_fault][-1:] + [
        s for s in st.successes if s >= t_fault
    ]
    gaps = [b - a for a, b in itertools.pairwise(around)]
    errors_in = [e for e in st.errors if e >= t_fault]
    if len(st.errors) > len(errors_in):
        log.warning("%s: %d error(s) before the fault", c.name, len(st.errors) - len(errors_in))
    return Recovery(
        key=c.key,
        contender=c.name,
        fault=fault.name,
        fault_key=fault.key,
        repetition=repetition,
        together=plan.together,
        fault_seconds=round(t_ready - t_fault, 4),
        recovery=first_ok_after(t_ready),
        recovery_from_ready_file=None if t_file is None else first_ok_after(t_file),
        errors=len(errors_in),
        error_kinds=dict(st.kinds),
        longest_gap=round(max(gaps, default=0.0), 4),
        longest_call=round(max((d for e, d in st.calls if e >= t_fault), default=0.0), 4),
        reads_ok=len(st.successes),
        foreign_load=None if load is None else round(load, 3),
    )


async def measure(
    pg: PostgresServer,
    proxy: ChaosProxy | None,
    group: Sequence[Contender],
    fault: Fault,
    repetition: int,
    plan: FaultPlan,
) -> list[Recovery]:
    """Open every contender of *group*, run its readers, inject *fault* once, observe."""
    target = ProxyTarget.of(pg, proxy) if fault.via_proxy and proxy is not None else pg
    if fault.via_proxy and proxy is None:
        raise RuntimeError(f"{fault.name}: needs a proxy")
    states = {c.key: _Reader() for c in group}
    tasks: list[asyncio.Task[None]] = []
    async with contextlib.AsyncExitStack() as stack:
        for c in group:
            subject = await stack.enter_async_context(c.open(target, plan.size))
            for i in range(plan.readers):
                tasks.append(asyncio.create_task(_read_loop(subject.op, i, states[c.key])))
        try:
            await asyncio.sleep(plan.warmup)
            silent = [c.name for c in group if not states[c.key].successes]
            if silent:
                raise RuntimeError(f"no successful read before the fault: {silent}")
            meter = CpuMeter(pg)
            meter.start()
            t_fault = time.monotonic()
            try:
                await fault.inject(pg, proxy, plan.down)
            finally:
                t_ready = time.monotonic()
                wall_ready = time.time()
                for st in states.values():
                    st.ready_at = t_ready
            t_file = None
            ready_file = _ready_file_time(pg) if fault.server_down else None
            if ready_file is not None and wall_ready - ready_file < 60:
                t_file = t_ready - (wall_ready - ready_file)  # same instant, monotonic clock
            waits = [st.recovered.wait() for st in states.values()]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), plan.cap)
            await asyncio.sleep(plan.tail)
            load = meter.stop()
        finally:
            for st in states.values():
                st.stop = True
            await finish(tasks, timeout=plan.cap)
    foreign = None if load is None else load.foreign
    return [
        _summary(c, states[c.key], fault, repetition, plan, t_fault, t_ready, t_file, foreign)
        for c in group
    ]


async def bench_recovery(
    pg: PostgresServer,
    proxy: ChaosProxy | None,
    contenders: Sequence[Contender],
    plan: FaultPlan,
) -> list[Recovery]:
    results: list[Recovery] = []
    for fault_key, reps in plan.reps.items():
        fault = FAULTS[fault_key]
        for rep in range(1, reps + 1):
            # Alternate who goes first, so no one always meets a freshly restarted server.
            order = list(contenders) if rep % 2 else list(contenders)[::-1]
            for group in [order] if plan.together else [[c] for c in order]:
                gc.collect()
                for r in await measure(pg, proxy, group, fault, rep, plan):
                    log.info(
                        "fault %-9s #%d %-24s ready->ok %s s, %d errors, gap %.3f s",
                        fault_key,
                        rep,
                        r.contender,
                        "n/a" if r.recovery is None else f"{r.recovery:.3f}",
                        r.errors,
                        r.longest_gap,
                    )
                    results.append(r)
                await asyncio.sleep(0.2)
    return results
