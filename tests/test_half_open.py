"""Guarantee 7: a half-open connection costs a caller no more than its own deadline."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import pool_for, until_value


async def _active_queries(pg: PostgresServer, app_name: str) -> int:
    rows = await pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state = 'active'",
        (app_name,),
    )
    return int(rows[0][0])


@pytest.mark.parametrize("how", ["asyncio.wait_for", "anyio.fail_after"])
async def test_frozen_peer_costs_only_the_deadline(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str, how: str
) -> None:
    """A query stuck on a frozen peer returns TimeoutError at the caller's deadline, the
    pool stays exact, and the server stops the abandoned query (background cancel)."""
    assert chaos_proxy.dsn is not None
    async with pool_for(chaos_proxy.dsn, app_name, min_size=1, max_size=2) as pool:
        await pool.fetchval("SELECT 1")
        # Freeze only the pool's current session; new ones (the cancel request) pass.
        busy = pool.fetchval("SELECT pg_sleep(30)")
        t0 = time.monotonic()

        async def freeze_soon() -> None:
            await anyio.sleep(0.2)
            await anyio.to_thread.run_sync(chaos_proxy.freeze)

        async with anyio.create_task_group() as tg:
            tg.start_soon(freeze_soon)
            # asyncio.TimeoutError is TimeoutError from Python 3.11 on.
            with pytest.raises((TimeoutError, asyncio.TimeoutError)):
                if how == "asyncio.wait_for":
                    await asyncio.wait_for(busy, 1.0)
                else:
                    with anyio.fail_after(1.0):
                        await busy
        elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed < 1.5
        s = pool.stats
        assert (s.in_use, s.waiting) == (0, 0)
        # The abandoned pg_sleep(30) is cancelled on the server, not left running.
        await until_value(lambda: _active_queries(pg, app_name), 0, timeout=5)
        await anyio.to_thread.run_sync(chaos_proxy.thaw)
        assert await pool.fetchval("SELECT 1") == 1
