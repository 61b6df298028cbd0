#!/usr/bin/env python
"""Multiplexed reads: many concurrent reads sharing connections in pipeline mode.

One throwaway PostgreSQL (``ssl=on``), every client over TLS to 127.0.0.1, one process.
``SELECT 1`` back to back (answers checked) from 1, 16, 32, 64 and 256 tasks, with pools of
at most 2, 8 and 32 connections:

- aiopg_resilient with ``multiplex=True`` (``min_size=1``: it opens what it needs) and
  without (``multiplex=False``, the default);
- raw psycopg: *size* held connections, one query in flight each (task i on connection
  i % size, behind its lock);
- psycopg_pool in autocommit (*size* connections).

Prints a markdown table of ops/s, the ratio to raw held connections of the same size and
the server connections each contender used (aiopg_resilient: the peak of ``pool.stats.size``
sampled during the run), then the two targets at 32 tasks: multiplex over at most 8
connections against 8 raw held ones (>= 1.3x), and over at most 2 against the same 8 raw
held ones (>= 1.0x); raw held 8 is measured at 32 tasks even when 8 is not in ``--sizes``.
``--rounds N`` measures every cell N times, interleaved, and keeps the median. ``--write``
also writes ``docs/benchmarks/multiplex.md`` and ``multiplex.png``, ``--json PATH`` every
number. Progress goes to stderr. Usage::

    .venv/bin/python bench/bench_multiplex.py [--seconds 1.5] [--warmup 0.3] [--rounds 1]
        [--tasks 1 16 32 64 256] [--sizes 2 8 32] [--write] [--json PATH] [--note TEXT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import shlex
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _mux_report as report
from _common import (
    QUERY,
    SETUP_TIMEOUT,
    TLS_QUERY,
    Op,
    Subject,
    Target,
    finish,
    log,
    setup_logging,
)
from _cpu_meter import CpuMeter, Load
from _machine import loadavg, machine, server_info, versions
from _mux_report import MULTIPLEX, RAW, TARGET_RAW_SIZE, TARGET_TASKS, Cell
from _psycopg import open_psycopg_pool_autocommit, open_raw
from _throughput import DISTURBED, drive

from aiopg_resilient import ResilientPool
from aiopg_resilient.testing import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks"
PEAK_EVERY = 0.005  # seconds between two samples of pool.stats.size


@dataclass
class Probe:
    """An opened contender: its read, a TLS probe, and the server connections it has."""

    op: Op
    tls: Callable[[], Awaitable[Any]]
    connections: Callable[[], int]


Opener = Callable[[Target, int], contextlib.AbstractAsyncContextManager[Probe]]


def _resilient(multiplex: bool) -> Opener:
    @contextlib.asynccontextmanager
    async def open_pool(target: Target, size: int) -> AsyncIterator[Probe]:
        pool = ResilientPool(
            target.dsn, min_size=1, max_size=size, multiplex=multiplex, name="bench"
        )
        async with pool:
            await pool.wait(timeout=SETUP_TIMEOUT)

            async def op(_: int) -> Any:
                return await pool.fetchval(QUERY)

            yield Probe(op, lambda: pool.fetchone(TLS_QUERY), lambda: pool.stats.size)

    return open_pool


def _held(
    opener: Callable[[Target, int], contextlib.AbstractAsyncContextManager[Subject]],
) -> Opener:
    """A contender holding *size* connections from the start."""

    @contextlib.asynccontextmanager
    async def open_held(target: Target, size: int) -> AsyncIterator[Probe]:
        async with opener(target, size) as subject:
            yield Probe(subject.op, subject.tls, lambda: size)

    return open_held


OPENERS: dict[str, Opener] = {
    MULTIPLEX: _resilient(True),
    "resilient": _resilient(False),
    RAW: _held(open_raw),
    "psycopg_pool": _held(open_psycopg_pool_autocommit),
}


@dataclass
class _Sample:
    rate: float
    connections: int
    errors: int
    first_error: str | None
    load: Load | None
    tls: str


async def _measure(
    pg: PostgresServer, key: str, size: int, tasks: int, args: argparse.Namespace
) -> _Sample:
    """Open the contender afresh, check its TLS, then time *tasks* readers while sampling
    its server connections."""
    gc.collect()
    meter = CpuMeter(pg)
    async with OPENERS[key](pg, size) as probe:
        row = await probe.tls()
        if not row or not row[0]:
            raise RuntimeError(f"{key} size {size}: the session is not over TLS")
        peak = probe.connections()
        stop = False

        async def sample() -> None:
            nonlocal peak
            while not stop:
                peak = max(peak, probe.connections())
                await asyncio.sleep(PEAK_EVERY)

        sampler = asyncio.create_task(sample())
        meter.start()
        try:
            ops, elapsed, errors, first = await drive(probe.op, tasks, args.warmup, args.seconds)
        finally:
            load = meter.stop()
            stop = True
            await finish([sampler])
        peak = max(peak, probe.connections())
    return _Sample(ops / elapsed, peak, errors, first, load, f"{row[1]} {row[2]}")


def _groups(sizes: Sequence[int], tasks: Sequence[int]) -> list[tuple[int, int, list[str]]]:
    """(size, tasks, contender keys) in the order measured; raw held 8 at 32 tasks is added
    when a target needs it and the grid lacks it."""
    groups = [(s, t, list(OPENERS)) for s in sizes for t in tasks]
    if TARGET_TASKS in tasks and TARGET_RAW_SIZE not in sizes:
        groups.append((TARGET_RAW_SIZE, TARGET_TASKS, [RAW]))
    return groups


def _cell(size: int, tasks: int, key: str, runs: Sequence[_Sample]) -> Cell:
    loads = [r.load for r in runs if r.load is not None]
    return Cell(
        size=size,
        tasks=tasks,
        key=key,
        contender=report.CONTENDER_NAMES[key],
        ops_per_s=round(statistics.median(r.rate for r in runs), 1),
        round_ops_per_s=[round(r.rate, 1) for r in runs],
        connections=max(r.connections for r in runs),
        errors=sum(r.errors for r in runs),
        first_error=next((r.first_error for r in runs if r.first_error), None),
        rounds_disturbed=sum(x.foreign > DISTURBED or x.steal > DISTURBED for x in loads),
        max_foreign_load=round(max(x.foreign for x in loads), 3) if loads else None,
    )


async def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Cell]]:
    started = time.monotonic()
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "bench/bench_multiplex.py", *args.argv]),
        "versions": versions(),
        "machine": machine(),
        "params": {k: getattr(args, k) for k in ("seconds", "warmup", "rounds", "tasks", "sizes")},
    }
    loadavg_start = loadavg()
    groups = _groups(args.sizes, args.tasks)
    samples: dict[tuple[int, int, str], list[_Sample]] = {}
    async with PostgresServer(ssl=True) as pg:
        meta["server"] = await server_info(pg)
        whole = CpuMeter(pg)
        whole.start()
        for rnd in range(args.rounds):
            for size, tasks, keys in groups:
                for key in keys if rnd % 2 == 0 else keys[::-1]:
                    s = await _measure(pg, key, size, tasks, args)
                    samples.setdefault((size, tasks, key), []).append(s)
                    meta.setdefault("tls", s.tls)
                    log.info(
                        "round %d/%d max %-2d tasks %-3d %-26s %8.0f ops/s, %d conns%s",
                        rnd + 1,
                        args.rounds,
                        size,
                        tasks,
                        report.CONTENDER_NAMES[key],
                        s.rate,
                        s.connections,
                        f", {s.errors} errors: {s.first_error}" if s.errors else "",
                    )
        load = whole.stop()
    cells = [_cell(s, t, k, samples[(s, t, k)]) for s, t, keys in groups for k in keys]
    report.set_ratios(cells)
    meta["load"] = {
        "foreign": None if load is None else round(load.foreign, 3),
        "steal": None if load is None else round(load.steal, 3),
        "worst_round": max((c.max_foreign_load or 0.0 for c in cells), default=0.0),
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg(),
        "note": args.note,
    }
    meta["elapsed"] = round(time.monotonic() - started, 1)
    return meta, cells


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seconds", type=float, default=1.5, help="timed seconds per cell and round")
    p.add_argument("--warmup", type=float, default=0.3, help="untimed seconds before each")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (median kept)")
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 16, 32, 64, 256])
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32], help="max_size values")
    p.add_argument(
        "--write",
        action="store_true",
        help=f"write {OUT.relative_to(ROOT)}/multiplex.md and multiplex.png",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write every number to PATH")
    p.add_argument("--note", help="a sentence for the report's load line (what else ran)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the libraries' warnings")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.argv = list(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    meta, cells = asyncio.run(run(args))
    goals = report.targets(cells)
    for c in cells:
        if c.errors:
            print(f"{c.contender} max {c.size} tasks {c.tasks}: {c.errors} errors: {c.first_error}")
    print(report.table(cells))
    print()
    print("\n".join(g["text"] for g in goals))
    if args.json is not None:
        data = {"meta": meta, "cells": [asdict(c) for c in cells], "targets": goals}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        log.info("wrote %s", args.json)
    if args.write:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "multiplex.md").write_text(report.markdown(meta, cells, goals))
        sub = f"{meta['date']}, {meta['machine']['cpus']} CPUs, {report.busy_text(meta)}"
        report.plot(cells, args.sizes, args.tasks, OUT / "multiplex.png", sub)
        log.info("wrote %s and multiplex.png", OUT / "multiplex.md")
    log.info("total %.1f s", meta["elapsed"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
