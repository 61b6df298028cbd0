#!/usr/bin/env python
"""Read benchmarks of aiopg_resilient against psycopg_pool, raw psycopg, asyncpg and SQLAlchemy.

One run, one throwaway PostgreSQL 15 (``ssl=on``) started by this script, every client over
TLS (``sslmode=verify-full``) to 127.0.0.1:

1. Throughput of ``SELECT 1`` at concurrency 1 and 32 (asyncio tasks), per contender:
   a. aiopg_resilient  ``await pool.fetchval("SELECT 1")`` (defaults: heartbeat on)
   b. psycopg_pool     ``async with pool.connection() as conn: await conn.execute(...)``
   c. psycopg_pool autocommit (same with ``kwargs={"autocommit": True}``)
   d. raw held psycopg ``AsyncConnection`` (autocommit)
   e. asyncpg pool     ``await pool.fetchval("SELECT 1")``
   f. psycopg_pool autocommit with ``check=AsyncConnectionPool.check_connection``
   g. SQLAlchemy async engine (psycopg, ``pool_pre_ping=True``)
   Pools hold 1 connection at concurrency 1 and 8 (min = max) above. Each cell
   is timed over several interleaved rounds; its rate is the median of the rounds that
   other load on the machine did not disturb (measured through /proc).
2. Recovery after ``restart -m fast`` (5 times) and after ``stop -m immediate``, 2 s down,
   ``start`` (once), for aiopg_resilient and psycopg_pool (4 connections each, otherwise
   default settings): one reader task reads as fast as it can; we time "server ready ->
   first successful read" and count the errors the reader saw.

Usage::

    .venv/bin/python bench/bench_reads.py [--seconds N] [--json PATH]

Results go to stdout as markdown tables; progress to stderr. See bench/README.md.

The parts: ``_contenders.py`` (a-g), ``_throughput.py`` (with ``_cpu_meter.py``),
``_recovery.py`` (with ``_faults.py``), ``_report.py`` and ``_common.py``; this module is the
command line, the run and the JSON. ``run_all.py`` runs every benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _common import log, setup_logging
from _contenders import CONTENDERS, pick
from _machine import versions
from _recovery import FaultPlan, Recovery, bench_recovery
from _report import report
from _throughput import Throughput, bench_throughput

from aiopg_resilient.testing import PostgresServer

RECOVERY_CONTENDERS = ["a", "b"]  # aiopg_resilient and psycopg_pool


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "versions": versions(),
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
            plan = FaultPlan(reps={"restart": args.fast_reps, "crash": args.immediate_reps})
            recovery = await bench_recovery(pg, None, pick(RECOVERY_CONTENDERS), plan)
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
    setup_logging(args.verbose)
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
