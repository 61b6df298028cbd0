#!/usr/bin/env python
"""The cost of write safety: a single-row INSERT, four ways, in one run.

One throwaway PostgreSQL 15 (``ssl=on``, ``synchronous_commit=on``, ``fsync=off``) started
by this script; every client over TLS (``sslmode=verify-full``) to 127.0.0.1.

- raw psycopg, autocommit: ``await conn.execute(INSERT)`` on held connections (1 round
  trip, and unsafe: a lost answer leaves the write in doubt, a retry may double it);
- ``pool.execute(INSERT, idempotent=True)``: replayed like a read (1 round trip);
- ``pool.execute(INSERT)``: write-safe (BEGIN + INSERT + xid pipelined, then COMMIT);
- psycopg_pool ``async with pool.connection() as conn: await conn.execute(INSERT)``
  (BEGIN, INSERT, COMMIT: what psycopg_pool users run by default).

At concurrency 1 (one connection) and 16 (8 connections). Prints a markdown table of
INSERTs/s and the ratio to raw psycopg. Usage::

    .venv/bin/python bench/bench_writes.py [--seconds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool

from aiopg_resilient import ResilientPool
from aiopg_resilient.testing import PostgresServer

INSERT = "INSERT INTO bench_w (k, v) VALUES (%s, 1)"
SIZES = {1: 1, 16: 8}  # concurrency -> connections

Op = Callable[[str], Awaitable[Any]]


@contextlib.asynccontextmanager
async def raw(dsn: str, size: int) -> AsyncIterator[Op]:
    conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(size)]
    free: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)

    async def op(key: str) -> None:
        conn = await free.get()
        try:
            await conn.execute(INSERT, (key,))
        finally:
            free.put_nowait(conn)

    try:
        yield op
    finally:
        for c in conns:
            await c.close()


@contextlib.asynccontextmanager
async def resilient(dsn: str, size: int, idempotent: bool) -> AsyncIterator[Op]:
    async with ResilientPool(dsn, min_size=size, max_size=size) as pool:

        async def op(key: str) -> None:
            await pool.execute(INSERT, (key,), idempotent=idempotent)

        yield op


@contextlib.asynccontextmanager
async def psycopg_pool_default(dsn: str, size: int) -> AsyncIterator[Op]:
    async with psycopg_pool.AsyncConnectionPool(
        dsn, min_size=size, max_size=size, open=False
    ) as pool:
        await pool.wait()

        async def op(key: str) -> None:
            async with pool.connection() as conn:
                await conn.execute(INSERT, (key,))

        yield op


CONTENDERS: dict[str, Callable[[str, int], contextlib.AbstractAsyncContextManager[Op]]] = {
    "raw psycopg autocommit (unsafe)": raw,
    "aiopg_resilient execute(idempotent=True)": lambda d, n: resilient(d, n, True),
    "aiopg_resilient execute() (write-safe)": lambda d, n: resilient(d, n, False),
    "psycopg_pool connection() (BEGIN/INSERT/COMMIT)": psycopg_pool_default,
}


async def measure(op: Op, concurrency: int, seconds: float, tag: str) -> float:
    counter = itertools.count()
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        while time.monotonic() < t_end:
            await op(f"{tag}-{w}-{next(counter)}")
            done += 1

    # warm-up
    t_end = time.monotonic() + min(0.5, seconds / 4)
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    done = 0
    t0 = time.monotonic()
    t_end = t0 + seconds
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / (time.monotonic() - t0)


async def main(seconds: float, json_path: Path | None) -> None:
    results: dict[str, dict[int, float]] = {}
    async with PostgresServer() as server:
        await server.execute("CREATE TABLE bench_w (k text, v int)")
        for name, make in CONTENDERS.items():
            for concurrency, size in SIZES.items():
                print(f"  {name} at {concurrency} ...", file=sys.stderr)
                async with make(server.dsn, size) as op:
                    rate = await measure(op, concurrency, seconds, f"{len(results)}{concurrency}")
                results.setdefault(name, {})[concurrency] = rate
                await server.execute("TRUNCATE bench_w")
    base = next(iter(results.values()))
    print("\n| INSERT of one row | 1 task | ratio | 16 tasks (8 conns) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, by_c in results.items():
        print(
            f"| {name} | {by_c[1]:,.0f}/s | {by_c[1] / base[1]:.2f} | "
            f"{by_c[16]:,.0f}/s | {by_c[16] / base[16]:.2f} |"
        )
    if json_path is not None:
        await asyncio.to_thread(json_path.write_text, json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.json))
