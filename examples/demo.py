"""Demo: a throwaway SSL PostgreSQL, a TLS proxy that cuts every session each second, and
the same reads through plain psycopg and through aiopg_resilient.

Run it with ``bash scripts/demo`` from a fresh clone (or ``python examples/demo.py``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import psycopg

from aiopg_resilient import ResilientPool
from aiopg_resilient.testing import ChaosProxy, PostgresServer

SECONDS = 3.0


async def plain_psycopg(dsn: str, errors: collections.Counter[str]) -> int:
    """One psycopg connection, reconnected after each error: what users run today."""
    ok = 0
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    t_end = time.monotonic() + SECONDS
    while time.monotonic() < t_end:
        try:
            await conn.execute("SELECT 1")
            ok += 1
        except psycopg.OperationalError as exc:
            errors[str(exc).splitlines()[0]] += 1
            await conn.close()
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await asyncio.sleep(0.005)
    await conn.close()
    return ok


async def resilient(dsn: str, errors: collections.Counter[str]) -> int:
    ok = 0
    async with ResilientPool(dsn, min_size=2, max_size=4) as pool:
        t_end = time.monotonic() + SECONDS
        while time.monotonic() < t_end:
            try:
                await pool.fetchval("SELECT 1")
                ok += 1
            except psycopg.OperationalError as exc:
                errors[str(exc).splitlines()[0]] += 1
            await asyncio.sleep(0.005)
    return ok


async def cut_every_second(proxy: ChaosProxy) -> None:
    while True:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(proxy.cut)


async def main() -> None:
    print("starting a throwaway PostgreSQL with ssl=on ...")
    async with PostgresServer() as server:
        version = (await server.execute("SHOW server_version"))[0][0]
        print(f"  PostgreSQL {version} on {server.host}:{server.port}, SSL verified (verify-full)")
        with ChaosProxy.for_server(server, tls=True) as proxy:
            assert proxy.dsn is not None
            print(f"  TLS-terminating chaos proxy on {proxy.host}:{proxy.port}")
            for label, run in (("plain psycopg", plain_psycopg), ("aiopg_resilient", resilient)):
                errors: collections.Counter[str] = collections.Counter()
                cutter = asyncio.ensure_future(cut_every_second(proxy))
                try:
                    ok = await run(proxy.dsn, errors)
                finally:
                    cutter.cancel()
                    await asyncio.gather(cutter, return_exceptions=True)
                print(f"\n{label}: {ok} reads succeeded, {sum(errors.values())} errors")
                for message, count in errors.most_common():
                    print(f"  {count} x {message}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="  log: %(name)s: %(message)s")
    asyncio.run(main())
