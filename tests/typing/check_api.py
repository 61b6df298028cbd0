"""Never run: type-checked by mypy (scripts/test) to keep the public API's types honest."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import Notify

from aiopg_resilient import (
    CommitUnknown,
    DatabaseUnavailable,
    Failure,
    PoolStats,
    Reconnected,
    ResilientConnection,
    ResilientPool,
    RetryPolicy,
    classify,
    is_disconnect,
)


async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("SET statement_timeout = '5s'")


async def transfer(conn: psycopg.AsyncConnection[Any], a: int, b: int, amount: int) -> str:
    await conn.execute("UPDATE acct SET bal = bal - %s WHERE id = %s", (amount, a))
    await conn.execute("UPDATE acct SET bal = bal + %s WHERE id = %s", (amount, b))
    return "ok"


async def use_pool() -> None:
    policy = RetryPolicy(initial=0.1, timeout=10.0, jitter="decorrelated")
    async with ResilientPool(
        "dbname=app", min_size=2, max_size=8, retry=policy, configure=configure
    ) as pool:
        rows: list[Any] = await pool.fetch("SELECT 1")
        n: int = await pool.execute("DELETE FROM t WHERE id = %s", (1,))
        await pool.execute("UPDATE t SET x = 1", idempotent=True)
        result: str = await pool.run_transaction(transfer, 1, 2, amount=5)
        async with pool.transaction() as conn:
            await conn.execute("SELECT 1")
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        stats: PoolStats = pool.stats
        size: int = stats.size
        await pool.check()
        print(rows, n, result, size)


async def use_connection() -> None:
    async with ResilientConnection("dbname=app", heartbeat_interval=5.0) as db:
        value: Any = await db.fetchval("SELECT 1")
        async for item in db.listen("jobs"):
            if isinstance(item, Reconnected):
                downtime: float = item.downtime
                print(downtime)
            else:
                notify: Notify = item
                print(notify.payload, value)


def errors(exc: Exception) -> None:
    failure: Failure = classify(exc)
    gone: bool = is_disconnect(exc)
    if isinstance(exc, CommitUnknown):
        xid: int | None = exc.xid
        print(xid)
    if isinstance(exc, DatabaseUnavailable):
        attempts: int = exc.attempts
        print(attempts)
    print(failure, gone)


def events_and_metrics(pool: ResilientPool) -> None:
    from collections.abc import Callable

    from aiopg_resilient import PoolEvent
    from aiopg_resilient.metrics import otel, prometheus

    def reader(event: PoolEvent) -> None:
        wait: float | None = event.duration
        print(event.kind, wait)

    stop: Callable[[], None] = pool.subscribe(reader, per_operation=True)
    stop()
    with prometheus.instrument(pool), otel.instrument(pool):
        pass
