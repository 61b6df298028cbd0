"""Guarantee 1 and 6: 32 readers over a pool of 8 see no error while real faults hit.

Each scenario runs the readers for a few seconds while one kind of fault is injected
for real (proxy cuts, resets, TLS close_notify cuts, pg_terminate_backend, server
restart or stop). Every read checks it got its own value back.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import psycopg
import pytest

from aiopg_resilient import DatabaseUnavailable, ResilientPool, RetryPolicy
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import pool_for, until

pytestmark = pytest.mark.slow

READERS = 32


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.wrong = 0
        self.errors: list[BaseException] = []


async def _reader(pool: ResilientPool, n: int, stop: anyio.Event, tally: Tally) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        want = n * 100_000 + i
        try:
            got = await pool.fetchval("SELECT %s::int", (want,))
        except Exception as exc:
            tally.errors.append(exc)
            await anyio.sleep(0.05)
            continue
        if got == want:
            tally.ok += 1
        else:
            tally.wrong += 1
        await anyio.sleep(0.002)


async def _bursty_reader(pool: ResilientPool, n: int, stop: anyio.Event, tally: Tally) -> None:
    """Reads in 0.3 s bursts separated by 2.6 s of silence (idle-cut scenario)."""
    while not stop.is_set():
        t_end = time.monotonic() + 0.3
        while time.monotonic() < t_end:
            want = n
            try:
                got = await pool.fetchval("SELECT %s::int", (want,))
            except Exception as exc:
                tally.errors.append(exc)
                continue
            tally.ok += got == want
            tally.wrong += got != want
            await anyio.sleep(0.01)
        with anyio.move_on_after(2.6):
            await stop.wait()


async def _run(
    pool: ResilientPool,
    inject: Callable[[], Awaitable[None]],
    *,
    reader: Callable[[ResilientPool, int, anyio.Event, Tally], Awaitable[None]] = _reader,
) -> Tally:
    tally = Tally()
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        for n in range(READERS):
            tg.start_soon(reader, pool, n, stop, tally)
        await anyio.sleep(0.3)
        await inject()
        await anyio.sleep(0.5)
        stop.set()
    return tally


def _assert_clean(tally: Tally, minimum: int) -> None:
    assert tally.errors == []
    assert tally.wrong == 0
    assert tally.ok >= minimum


def _pool(dsn: str, app_name: str) -> ResilientPool:
    return pool_for(dsn, app_name, min_size=8, max_size=8)


async def _every_second(times: int, fault: Callable[[], object]) -> None:
    for _ in range(times):
        await anyio.sleep(1.0)
        await anyio.to_thread.run_sync(fault)


async def test_tls_cuts(pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str) -> None:
    """A TLS proxy closing every session each second ("SSL connection has been closed
    unexpectedly") costs readers nothing."""
    assert tls_chaos_proxy.dsn is not None
    async with _pool(tls_chaos_proxy.dsn, app_name) as pool:
        tally = await _run(pool, lambda: _every_second(4, tls_chaos_proxy.cut))
    _assert_clean(tally, 500)
    assert pool.stats.connections_lost >= 8


async def test_fin_cuts(pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str) -> None:
    """TCP FIN on every session each second costs readers nothing."""
    assert chaos_proxy.dsn is not None
    async with _pool(chaos_proxy.dsn, app_name) as pool:
        tally = await _run(pool, lambda: _every_second(4, chaos_proxy.cut))
    _assert_clean(tally, 500)
    assert pool.stats.connections_lost >= 8


async def test_resets(pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str) -> None:
    """TCP RST on every session each second costs readers nothing."""
    assert chaos_proxy.dsn is not None
    async with _pool(chaos_proxy.dsn, app_name) as pool:
        tally = await _run(pool, lambda: _every_second(4, chaos_proxy.reset))
    _assert_clean(tally, 500)
    assert pool.stats.connections_lost >= 8


async def test_terminate_backends(pg: PostgresServer, app_name: str) -> None:
    """pg_terminate_backend of every pool backend each second costs readers nothing."""

    async def inject() -> None:
        for _ in range(4):
            await anyio.sleep(1.0)
            assert await pg.terminate_backends(application_name=app_name) >= 1

    async with _pool(pg.dsn, app_name) as pool:
        tally = await _run(pool, inject)
    _assert_clean(tally, 500)
    assert pool.stats.connections_lost >= 8


async def test_restart_fast(pg: PostgresServer, app_name: str) -> None:
    """pg_ctl restart -m fast costs readers nothing."""

    async def inject() -> None:
        await anyio.sleep(0.5)
        await pg.restart("fast")
        await anyio.sleep(1.0)

    async with _pool(pg.dsn, app_name) as pool:
        tally = await _run(pool, inject)
    _assert_clean(tally, 300)


async def test_stop_immediate_then_start(pg: PostgresServer, app_name: str) -> None:
    """stop -m immediate, 2 s down, then start: readers wait it out and see no error."""

    async def inject() -> None:
        await anyio.sleep(0.5)
        await pg.stop("immediate")
        await anyio.sleep(2.0)
        await pg.start()
        await anyio.sleep(1.0)

    async with _pool(pg.dsn, app_name) as pool:
        tally = await _run(pool, inject)
    _assert_clean(tally, 300)


async def test_idle_cut_with_bursty_traffic(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """A load balancer closing sessions idle for 2 s, between bursts, costs nothing."""
    assert chaos_proxy.dsn is not None
    chaos_proxy.idle_cut(2.0)

    async def inject() -> None:
        await anyio.sleep(6.5)

    async with _pool(chaos_proxy.dsn, app_name) as pool:
        tally = await _run(pool, inject, reader=_bursty_reader)
    _assert_clean(tally, 200)
    assert pool.stats.connections_lost >= 8


async def test_long_outage_gives_database_unavailable_single_flight(
    pg: PostgresServer, chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """Past retry.timeout callers get DatabaseUnavailable, and the pool never has more
    than one connection attempt in flight while the server is down."""
    assert chaos_proxy.dsn is not None
    policy = RetryPolicy(timeout=1.5)
    async with pool_for(chaos_proxy.dsn, app_name, min_size=4, max_size=8, retry=policy) as pool:
        await pg.stop("immediate")
        try:
            # The pool's idle connection is dead but still open on both sides of the
            # proxy until the pool looks at it: drop it now and let the proxy see its
            # session end, so `peak_open` counts connection attempts only (a reader
            # finding it dead would close it just before its reconnect, and the proxy
            # may see the new session before the old one's end).
            await pool.check()
            await until(lambda: chaos_proxy.stats.open == 0)
            chaos_proxy.reset_stats()
            results: list[BaseException | int] = []

            async def call() -> None:
                try:
                    results.append(await pool.fetchval("SELECT 1"))
                except Exception as exc:
                    results.append(exc)

            t0 = time.monotonic()
            async with anyio.create_task_group() as tg:
                for _ in range(READERS):
                    tg.start_soon(call)
            elapsed = time.monotonic() - t0
        finally:
            await pg.start()
        assert len(results) == READERS
        assert all(isinstance(r, DatabaseUnavailable) for r in results), results[:3]
        first = results[0]
        assert isinstance(first, DatabaseUnavailable)
        assert first.attempts >= 1
        assert first.last_error is not None
        assert 1.4 <= elapsed < 5.0
        assert chaos_proxy.stats.peak_open <= 1
        # ... and the server is used again as soon as it is back.
        with anyio.fail_after(2):
            assert await pool.fetchval("SELECT 1") == 1


async def test_too_many_connections_is_waited_out(pg: PostgresServer, app_name: str) -> None:
    """ "too many connections" (53300) is retried with backoff: the read succeeds once a
    slot frees up, with no error for the caller."""
    role = f"limited_{app_name}"
    await pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' CONNECTION LIMIT 1")
    try:
        dsn = pg.conninfo(user=role, password="pw")
        hog = await psycopg.AsyncConnection.connect(dsn)
        async with pool_for(dsn, app_name, min_size=0, max_size=1) as pool:

            async def free_slot_soon() -> None:
                await anyio.sleep(0.5)
                await hog.close()

            async with anyio.create_task_group() as tg:
                tg.start_soon(free_slot_soon)
                with anyio.fail_after(5):
                    assert await pool.fetchval("SELECT current_user") == role
            assert pool.stats.connect_failures >= 1
            assert pool.stats.last_error is not None
            assert "too many connections" in pool.stats.last_error
    finally:
        await pg.execute(f"DROP ROLE IF EXISTS {role}")
