"""The event stream the metrics read: readers added after construction, and the
per-operation events (``acquire``/``release``) made only while a reader asks for them.

Also the faulty workload the metrics tests run (a real proxy cut, real terminated
backends), so both adapters are read back after the same faults.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, get_args

import anyio
import anyio.lowlevel
import pytest

from aiopg_resilient import PoolEvent, PoolTimeout, ResilientPool
from aiopg_resilient._events import PER_OPERATION, EventKind
from aiopg_resilient.metrics._common import COUNTED, TIMED
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import pool_for, until

READS = 10
HELD = 0.2
OUR_COUNTERS = (
    "connect_failures",
    "connections_lost",
    "retries",
    "heartbeats",
    "heartbeat_failures",
    "outages",
    "commits_in_doubt",
)
"""The counters the adapters add under aiopg_resilient.pool (the tests expect them all)."""


async def reads(pool: ResilientPool, n: int = READS) -> None:
    """*n* reads, each checked."""
    for i in range(n):
        assert await pool.fetchval("SELECT %s::int", (i,)) == i


async def faulty_workload(
    pool: ResilientPool, pg: PostgresServer, proxy: ChaosProxy, app_name: str
) -> int:
    """Reads; every session cut at the proxy; reads; every backend of the pool
    terminated; reads. Returns how many reads succeeded (all of them)."""
    await reads(pool)
    assert await anyio.to_thread.run_sync(proxy.cut) >= 1
    await reads(pool)
    await until(lambda: pool.stats.size >= pool.min_size)
    assert await pg.terminate_backends(app_name) >= 1
    await reads(pool)
    assert pool.stats.connections_lost >= 2
    return 3 * READS


async def saturated(pool: ResilientPool, pending: Callable[[], Awaitable[None] | None]) -> None:
    """On a pool of max_size=1 (acquire_timeout=1): its connection held while another
    caller waits (``pending()`` runs then), for HELD seconds, then released to it; held
    again until a second caller gives up (PoolTimeout). Three borrows, one timeout."""

    async def waits(held: anyio.Event) -> None:
        await held.wait()
        await reads(pool, 1)

    async def times_out(held: anyio.Event) -> None:
        await held.wait()
        with pytest.raises(PoolTimeout):
            await pool.fetchval("SELECT 1")

    callers: tuple[Callable[[anyio.Event], Coroutine[Any, Any, None]], ...]
    callers = (waits, times_out)
    for caller in callers:
        held = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller, held)  # outside the block: a caller of its own
            async with pool.connection():
                held.set()
                await until(lambda: pool.stats.waiting == 1)
                result = pending()
                if inspect.isawaitable(result):
                    await result
                if caller is waits:
                    await anyio.sleep(HELD)  # then released: the caller gets it
                else:
                    await until(lambda: pool.stats.acquire_timeouts == 1, timeout=5)


def quiet(dsn: str, app_name: str, **kwargs: object) -> ResilientPool:
    """A pool with no background heartbeat, so its counts only move when the test acts."""
    return pool_for(dsn, app_name, heartbeat_interval=None, **kwargs)


async def test_no_per_operation_events_without_a_reader_for_them(
    pg: PostgresServer, app_name: str
) -> None:
    """With only on_event (and a plain subscriber), the pool makes no acquire/release
    event at all: the flag stays off and nothing is tracked per borrow."""
    seen: list[PoolEvent] = []
    later: list[str] = []
    pool = quiet(pg.dsn, app_name, on_event=seen.append)
    unsubscribe = pool.subscribe(lambda e: later.append(e.kind))  # before open: sees connect
    async with pool:
        await reads(pool)
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        assert pool._events.per_op is False
        assert pool._events._borrowed == {}
        unsubscribe()
    kinds = {e.kind for e in seen}
    assert "connect" in kinds
    assert kinds.isdisjoint({"acquire", "release"})
    assert "connect" in later
    assert set(later).isdisjoint({"acquire", "release"})


async def test_per_operation_reader_sees_every_borrow_then_unsubscribes(
    pg: PostgresServer, app_name: str
) -> None:
    """A per-operation reader gets one acquire and one release per borrow, with their
    durations, while on_event still sees none; after unsubscribing, nothing more, and
    the pool tracks no borrow."""
    plain: list[str] = []
    ops: list[PoolEvent] = []
    async with quiet(pg.dsn, app_name, on_event=lambda e: plain.append(e.kind)) as pool:
        unsubscribe = pool.subscribe(ops.append, per_operation=True)
        assert pool._events.per_op is True
        await reads(pool)
        async with pool.connection() as conn:
            await anyio.sleep(0.05)
            await conn.execute("SELECT 1")
        unsubscribe()
        assert pool._events.per_op is False
        await reads(pool)
        assert pool._events._borrowed == {}
    acquires = [e for e in ops if e.kind == "acquire"]
    releases = [e for e in ops if e.kind == "release"]
    assert len(acquires) == len(releases) == READS + 1
    assert all(e.pool == app_name and e.duration is not None for e in acquires + releases)
    assert all(e.duration is not None and 0 <= e.duration < 5 for e in acquires)
    assert max(e.duration or 0.0 for e in releases) >= 0.05
    assert {"acquire", "release"}.isdisjoint(plain)


async def test_a_lost_borrow_ends_with_a_release(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """Borrows that end because the connection died (found dead by the query, dropped,
    replayed) are released too: acquires == releases == reads + retries after real
    faults, and no borrow is left tracked."""
    assert chaos_proxy.dsn is not None
    kinds: list[str] = []
    async with quiet(chaos_proxy.dsn, app_name, min_size=2, max_size=2) as pool:
        pool.subscribe(lambda e: kinds.append(e.kind), per_operation=True)
        done = await faulty_workload(pool, pg, chaos_proxy, app_name)
        stats = pool.stats
        assert pool._events._borrowed == {}
    assert kinds.count("acquire") == kinds.count("release") == done + stats.retries
    assert kinds.count("lost") == stats.connections_lost


async def test_cancelled_callers_end_their_borrows(pg: PostgresServer, app_name: str) -> None:
    """Callers cancelled at random points (waiting for a connection, mid-query): every
    acquire still has its release, and no borrow stays tracked."""
    kinds: list[str] = []
    rng = random.Random(11)

    async def caller(delay: float) -> None:
        with anyio.move_on_after(delay):
            await pool.fetchval("SELECT pg_sleep(0.02)")

    async with quiet(pg.dsn, app_name, min_size=2, max_size=3) as pool:
        pool.subscribe(lambda e: kinds.append(e.kind), per_operation=True)
        async with anyio.create_task_group() as tg:
            for _ in range(60):
                tg.start_soon(caller, rng.uniform(0.0, 0.3))
        await until(lambda: pool.stats.in_use == 0 and pool.stats.waiting == 0)
        assert pool._events._borrowed == {}
    assert kinds.count("acquire") == kinds.count("release") > 0


async def test_failing_and_async_readers_never_break_the_pool(
    pg: PostgresServer, app_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A per-operation reader that raises is logged and ignored; a coroutine reader
    runs as a task; both are removed by their unsubscribe functions."""
    got: list[str] = []

    def broken(event: PoolEvent) -> None:
        raise RuntimeError("a broken reader")

    async def slow(event: PoolEvent) -> None:
        await anyio.lowlevel.checkpoint()
        got.append(event.kind)

    async with quiet(pg.dsn, app_name) as pool:
        stop_broken = pool.subscribe(broken, per_operation=True)
        stop_slow = pool.subscribe(slow, per_operation=True)
        await reads(pool, 3)
        await until(lambda: got.count("release") == 3)
        stop_broken()
        stop_slow()
        stop_slow()  # twice is harmless
        await reads(pool, 3)
    assert got.count("acquire") == 3
    failed = [r.getMessage() for r in caplog.records if "event reader failed" in r.getMessage()]
    assert sum("'acquire'" in m for m in failed) == sum("'release'" in m for m in failed) == 3


def test_every_metric_is_fed_by_a_kind_the_pool_emits() -> None:
    """The adapters' tables name real event kinds (a typo would silently feed nothing),
    and the per-operation kinds feed the two histograms that need them."""
    kinds = set(get_args(EventKind))
    assert set(TIMED) | set(COUNTED) <= kinds
    assert {TIMED[kind].otel for kind in PER_OPERATION} == {
        "db.client.connection.wait_time",
        "db.client.connection.use_time",
    }
