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

Prints a markdown table of ops/s, the ratio to raw held connections of the same size, and
the server connections each contender ended with. Usage::

    .venv/bin/python bench/bench_multiplex.py [--seconds N] [--tasks 1 16 32 64 256] [--sizes 2 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import QUERY, Subject, Target, setup_logging
from _psycopg import open_psycopg_pool_autocommit, open_raw
from _throughput import drive

from aiopg_resilient import ResilientPool
from aiopg_resilient.testing import PostgresServer


def _resilient(multiplex: bool) -> Callable[[Target, int], Any]:
    @contextlib.asynccontextmanager
    async def open_pool(target: Target, size: int) -> AsyncIterator[Subject]:
        pool = ResilientPool(target.dsn, min_size=1, max_size=size, multiplex=multiplex)
        async with pool:
            await pool.wait()

            async def op(_: int) -> Any:
                return await pool.fetchval(QUERY)

            async def borrow() -> None:
                async with pool.connection():
                    pass

            subject = Subject(op=op, tls=lambda: pool.fetchval("SELECT 1"), borrow=borrow)
            subject.connections = lambda: pool.stats.size  # type: ignore[attr-defined]
            yield subject

    return open_pool


CONTENDERS: dict[str, Callable[[Target, int], Any]] = {
    "aiopg_resilient multiplex": _resilient(True),
    "aiopg_resilient": _resilient(False),
    "raw psycopg, held": open_raw,
    "psycopg_pool autocommit": open_psycopg_pool_autocommit,
}


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 16, 32, 64, 256])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32])
    args = parser.parse_args(argv)
    setup_logging()
    rows: list[tuple[int, int, str, float, int, str]] = []
    async with PostgresServer() as server:
        for size in args.sizes:
            for tasks in args.tasks:
                for name, opener in CONTENDERS.items():
                    async with opener(server, size) as subject:
                        ops, elapsed, errors, first = await drive(
                            subject.op, tasks, args.warmup, args.seconds
                        )
                        count = getattr(subject, "connections", None)
                        used = size if count is None else count()
                    if errors:
                        print(f"{name} size {size} tasks {tasks}: {errors} errors: {first}")
                    rows.append((size, tasks, name, ops / elapsed, used, first or ""))
    print("| max connections | tasks | contender | ops/s | vs raw held | server connections |")
    print("|---:|---:|---|---:|---:|---:|")
    raw = {(s, t): r for s, t, n, r, _, _ in rows if n == "raw psycopg, held"}
    for size, tasks, name, rate, used, _ in rows:
        print(
            f"| {size} | {tasks} | {name} | {rate:,.0f} | {rate / raw[(size, tasks)]:.2f} "
            f"| {used} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
