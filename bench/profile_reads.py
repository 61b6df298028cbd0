#!/usr/bin/env python
"""Profile one throughput cell of bench_reads.py with cProfile.

Usage::

    .venv/bin/python bench/profile_reads.py [--contender a] [--concurrency 32] [--seconds 3]

Starts its own PostgreSQL (TLS), runs the contender's ``SELECT 1`` loop under cProfile for
the given time after a warm-up, then prints the top functions by own time and by
cumulative time, and the same restricted to aiopg_resilient's own code (src/).
cProfile slows Python code down (2-3x here) but not the time spent waiting
for the server: compare shares between contenders, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import pool_size
from _contenders import CONTENDERS
from _throughput import drive

from aiopg_resilient.testing import PostgresServer


async def amain(args: argparse.Namespace) -> tuple[cProfile.Profile, int, float]:
    contender = next(c for c in CONTENDERS if c.key == args.contender)
    size = pool_size(args.concurrency)
    async with PostgresServer(ssl=True) as pg, contender.open(pg, size) as subject:
        await drive(subject.op, args.concurrency, 1.0, 0.5)  # warm-up
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            ops, elapsed, _, _ = await drive(subject.op, args.concurrency, 0.0, args.seconds)
        finally:
            profiler.disable()
    return profiler, ops, elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contender", default="a", choices=[c.key for c in CONTENDERS])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    if not 0 < args.seconds <= 60 or not 1 <= args.concurrency <= 1024:
        p.error("--seconds must be in (0, 60], --concurrency in [1, 1024]")
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    profiler, ops, elapsed = asyncio.run(amain(args))
    print(
        f"contender {args.contender} at concurrency {args.concurrency}: {ops} ops in "
        f"{elapsed:.2f} s = {ops / elapsed:,.0f} ops/s under cProfile"
    )
    for title, sort, restrict in (
        ("own time, all code", "tottime", ()),
        ("cumulative time, all code", "cumulative", ()),
        ("own time, aiopg_resilient", "tottime", ("aiopg_resilient",)),
        ("cumulative time, aiopg_resilient", "cumulative", ("aiopg_resilient",)),
    ):
        out = io.StringIO()
        st = pstats.Stats(profiler, stream=out)
        if not restrict:
            st.strip_dirs()
        st.sort_stats(sort).print_stats(*restrict, args.top)
        body = out.getvalue()
        start = body.find("   ncalls")
        print(f"\n### {title}\n")
        print(body[start:] if start >= 0 else body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
