"""The pool behind a real PgBouncer (1.18) in front of a real PostgreSQL.

PgBouncer hides the server's backend from the client: in transaction mode the next statement
may run on another server connection, where psycopg's automatic prepared statements do not
exist, and PgBouncer adds faults of its own (idle timeouts, PAUSE, RECONNECT, its own
restart). These tests prove that, out of the box:

1. a mixed read/write workload through PgBouncer in transaction mode (and session mode) sees
   no error, because a pooler is detected at connect and prepared statements are turned off
   (an explicit ``prepare_threshold`` of the user is kept);
2. a COMMIT whose answer is lost between the pool and PgBouncer is resolved by transaction id
   (the server-side pid learnt with the id is meaningful behind PgBouncer): exactly one row;
3. readers see no error and every acknowledged write is present exactly once under each of
   PgBouncer's faults;
4. PgBouncer's own ``query_wait_timeout`` error is classified as retryable, and the pool's
   reads ride through it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import psycopg
import pytest

from aiopg_resilient import Failure, ResilientPool, classify
from aiopg_resilient.testing import (
    ChaosProxy,
    PgBouncer,
    PostgresServer,
    ServerControlUnavailable,
)

from .conftest import pool_for

PoolMode = Literal["transaction", "session"]


@asynccontextmanager
async def _bouncer(
    pg: PostgresServer,
    pool_mode: PoolMode = "transaction",
    settings: Mapping[str, str] | None = None,
) -> AsyncIterator[PgBouncer]:
    """A started PgBouncer in front of `pg`; the test is skipped if PgBouncer is missing."""
    bed = PgBouncer(pg, pool_mode=pool_mode, settings=settings)
    try:
        await bed.open()
    except ServerControlUnavailable as exc:
        pytest.skip(str(exc))
    async with bed:
        yield bed


async def _console(bouncer: PgBouncer, command: str) -> list[dict[str, Any]]:
    """A SHOW command of PgBouncer's console, rows by column name."""
    async with await psycopg.AsyncConnection.connect(bouncer.admin_dsn, autocommit=True) as conn:
        cur = await conn.execute(command)
        names = [column.name for column in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


async def _server_pids(bouncer: PgBouncer) -> set[int]:
    """The PostgreSQL pids of PgBouncer's server connections (SHOW SERVERS)."""
    rows = await _console(bouncer, "SHOW SERVERS")
    return {int(row["remote_pid"]) for row in rows if row["database"] == bouncer.server.dbname}


async def _keys(pg: PostgresServer, table: str) -> dict[str, int]:
    """How many times each key is in *table*."""
    rows = await pg.execute(f"SELECT k, count(*) FROM {table} GROUP BY k")
    return {str(k): int(n) for k, n in rows}


async def _pool_connections(pool: ResilientPool, n: int) -> list[tuple[Any, bool]]:
    """``(prepare_threshold, pooled)`` of *n* of the pool's connections, held at once."""
    seen: list[tuple[Any, bool]] = []
    all_held = anyio.Event()

    async def hold() -> None:
        async with pool.connection() as conn:
            seen.append((conn.prepare_threshold, bool(getattr(conn, "pooled", False))))
            if len(seen) == n:
                all_held.set()
            await all_held.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(hold)
    return seen


# -- 1. the everyday workload ---------------------------------------------------------------

TASKS = 16
ITERATIONS = 40


@dataclass
class Mixed:
    errors: list[BaseException] = field(default_factory=list)
    wrong: int = 0
    reads: int = 0
    writes: int = 0


async def _mixed_workload(pool: ResilientPool, table: str, bouncer: PgBouncer) -> Mixed:
    """16 tasks x 40 x (a parametrized read, checked; an INSERT); RECONNECT half-way."""
    out = Mixed()
    done = 0
    halfway = anyio.Event()

    async def worker(n: int) -> None:
        nonlocal done
        for i in range(ITERATIONS):
            want = n * 1000 + i
            try:
                got = await pool.fetchval("SELECT %s::int", (want,))
                out.reads += 1
                out.wrong += got != want
                await pool.execute(f"INSERT INTO {table} VALUES (%s, %s)", (f"w{n}-{i}", i))
                out.writes += 1
            except Exception as exc:
                out.errors.append(exc)
            done += 1
            if done >= TASKS * ITERATIONS // 2:
                halfway.set()

    async with anyio.create_task_group() as tg:
        for n in range(TASKS):
            tg.start_soon(worker, n)
        await halfway.wait()
        await bouncer.admin("RECONNECT")
    return out


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
async def test_mixed_workload_works_out_of_the_box(
    pg: PostgresServer, app_name: str, table: str, pool_mode: PoolMode
) -> None:
    """No error, no wrong value, every write once, through PgBouncer with default settings
    (and a RECONNECT half-way); the pool's connections know they are behind a pooler and,
    in transaction mode, use no server-side prepared statement."""
    with anyio.fail_after(40):
        async with (
            _bouncer(pg, pool_mode) as bouncer,
            pool_for(bouncer.dsn, app_name, max_size=8) as pool,
        ):
            before = await _server_pids(bouncer)
            out = await _mixed_workload(pool, table, bouncer)
            assert out.errors == []
            assert (out.wrong, out.reads, out.writes) == (0, TASKS * ITERATIONS, TASKS * ITERATIONS)
            connections = await _pool_connections(pool, min(4, pool.stats.size))
            assert all(pooled for _, pooled in connections), connections
            if pool_mode == "transaction":
                assert all(threshold is None for threshold, _ in connections), connections
                # RECONNECT really replaced the server connections under the workload.
                after = await _server_pids(bouncer)
                assert before
                assert not before & after
            assert pool.stats.connections_lost == 0
        keys = await _keys(pg, table)
        assert len(keys) == TASKS * ITERATIONS
        assert set(keys.values()) == {1}


async def test_explicit_prepare_threshold_is_kept(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """The user's explicit ``prepare_threshold=0`` behind a transaction-mode PgBouncer is
    their choice: kept on every connection (the workload may then fail, which is why the
    layer turns prepared statements off by default)."""
    with anyio.fail_after(40):
        async with (
            _bouncer(pg, "transaction") as bouncer,
            pool_for(
                bouncer.dsn, app_name, max_size=8, connect_kwargs={"prepare_threshold": 0}
            ) as pool,
        ):
            out = await _mixed_workload(pool, table, bouncer)
            assert out.wrong == 0
            assert out.reads + out.writes + len(out.errors) >= TASKS * ITERATIONS
            connections = await _pool_connections(pool, min(4, max(pool.stats.size, 1)))
            assert connections
            assert all(pooled for _, pooled in connections), connections
            assert all(threshold == 0 for threshold, _ in connections), connections


# -- 2. a lost COMMIT answer, between the pool and PgBouncer --------------------------------


@pytest.mark.parametrize(("action", "applied"), [("cut_after", True), ("cut_before", False)])
async def test_commit_in_doubt_is_resolved_behind_pgbouncer(
    pg: PostgresServer, app_name: str, table: str, action: str, applied: bool
) -> None:
    """A ChaosProxy between the pool and PgBouncer cuts the session right after the COMMIT
    (it ran, its answer is lost) or right before it (it never arrived): execute() returns
    normally either way, resolved by transaction id through PgBouncer, with exactly one row,
    never re-run when committed."""
    with anyio.fail_after(20):
        async with _bouncer(pg, "transaction") as bouncer:
            with ChaosProxy(bouncer.host, bouncer.port) as proxy:
                dsn = bouncer.conninfo(host=proxy.host, port=proxy.port)
                async with pool_for(dsn, app_name, max_size=2, heartbeat_timeout=0.5) as pool:
                    await pool.fetchval("SELECT 1")
                    trigger = proxy.on_client_message(b"COMMIT", action)  # type: ignore[arg-type]
                    n = await pool.execute(f"INSERT INTO {table} VALUES ('k', 1)")
                    assert n == 1
                    assert trigger.count == 1
                    stats = pool.stats
                    assert stats.commits_resolved >= 1
                    assert stats.commits_unknown == 0
                    if applied:
                        assert stats.retries == 0  # committed: never re-run
                    else:
                        assert stats.retries >= 1  # not applied: re-run
    assert await _keys(pg, table) == {"k": 1}


# -- 3. PgBouncer's faults under readers and a writer ---------------------------------------

READERS = 8
RUN_FOR = 3.0


@dataclass
class Tally:
    reads: int = 0
    wrong: int = 0
    read_errors: list[BaseException] = field(default_factory=list)
    slowest_read: float = 0.0
    acked: list[str] = field(default_factory=list)
    write_errors: list[BaseException] = field(default_factory=list)


@dataclass(frozen=True)
class Fault:
    """One PgBouncer fault: its settings, what is done while the workload runs, how the
    readers behave, and what must show that the fault did happen."""

    settings: Mapping[str, str] = field(default_factory=dict)
    inject: Callable[[PgBouncer], Coroutine[Any, Any, None]] | None = None
    reader_pause: float = 0.01
    idle_in_transaction: bool = False
    cuts_clients: bool = False
    holds_reads: bool = False
    logged: tuple[str, ...] = ()
    """What PgBouncer logs (one of) when it closes a connection because of the fault."""


async def _terminate_servers(bouncer: PgBouncer) -> None:
    """pg_terminate_backend of PgBouncer's server connections, three times."""
    for _ in range(3):
        await anyio.sleep(0.6)
        pids = sorted(await _server_pids(bouncer))
        rows = await bouncer.server.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE pid = ANY(%s) AND backend_type = 'client backend' "
            "AND pid <> pg_backend_pid() AND usename = current_user "
            "AND datname = current_database()",
            (pids,),
        )
        assert int(rows[0][0]) >= 1


async def _reconnect(bouncer: PgBouncer) -> None:
    for _ in range(3):
        await anyio.sleep(0.6)
        await bouncer.admin("RECONNECT")


async def _pause(bouncer: PgBouncer) -> None:
    await anyio.sleep(0.5)
    await bouncer.admin("PAUSE")
    try:
        await anyio.sleep(1.0)
    finally:
        await bouncer.admin("RESUME")


async def _restart(bouncer: PgBouncer) -> None:
    await anyio.sleep(0.8)
    await bouncer.restart()


FAULTS: dict[str, Fault] = {
    "client_idle_timeout": Fault(
        settings={"client_idle_timeout": "1"},
        reader_pause=1.5,
        cuts_clients=True,
        logged=("client_idle_timeout",),
    ),
    "idle_transaction_timeout": Fault(
        settings={"idle_transaction_timeout": "1"},
        idle_in_transaction=True,
        cuts_clients=True,
        logged=("idle transaction timeout",),
    ),
    "server_lifetime": Fault(settings={"server_lifetime": "1"}, logged=("server lifetime over",)),
    "terminate_backend": Fault(inject=_terminate_servers, logged=("server conn crashed?",)),
    "reconnect": Fault(inject=_reconnect, logged=("close_needed", "obsolete connection")),
    "pause": Fault(inject=_pause, holds_reads=True, logged=("pause mode",)),
    "restart": Fault(inject=_restart, cuts_clients=True),
}

# In session mode a server connection is released only when its client leaves: server_lifetime,
# RECONNECT and PAUSE (which waits for every client to leave) are not faults a client sees, and
# client_idle_timeout applies only to clients without a server connection (it never fires).
SESSION_FAULTS = ["idle_transaction_timeout", "terminate_backend", "restart"]

CASES = [
    *[pytest.param("transaction", name, id=f"transaction-{name}") for name in FAULTS],
    *[pytest.param("session", name, id=f"session-{name}") for name in SESSION_FAULTS],
]


async def _reader(
    pool: ResilientPool, n: int, stop: anyio.Event, tally: Tally, pause: float
) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        want = n * 1_000_000 + i
        started = time.monotonic()
        try:
            got = await pool.fetchval("SELECT %s::int", (want,))
        except Exception as exc:
            tally.read_errors.append(exc)
            await anyio.sleep(0.05)
            continue
        tally.slowest_read = max(tally.slowest_read, time.monotonic() - started)
        tally.reads += 1
        tally.wrong += got != want
        await anyio.sleep(pause)


async def _writer(pool: ResilientPool, table: str, stop: anyio.Event, tally: Tally) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        key = f"w{i}"
        try:
            await pool.execute(f"INSERT INTO {table} VALUES (%s, %s)", (key, i))
        except Exception as exc:
            tally.write_errors.append(exc)
        else:
            tally.acked.append(key)
        await anyio.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize(("pool_mode", "fault_name"), CASES)
async def test_no_read_error_under_pgbouncer_faults(
    pg: PostgresServer, app_name: str, table: str, pool_mode: PoolMode, fault_name: str
) -> None:
    """8 readers and a writer for 3 s while PgBouncer misbehaves: no read fails or returns
    a wrong value, every acknowledged write is there exactly once, nothing is doubled; with
    idle_transaction_timeout a run_transaction body caught idling is re-run once."""
    fault = FAULTS[fault_name]
    tally = Tally()
    attempts = 0

    async def idle_once(conn: psycopg.AsyncConnection[Any]) -> int:
        nonlocal attempts
        attempts += 1
        await conn.execute(f"INSERT INTO {table} VALUES ('rt', %s)", (attempts,))
        if attempts == 1:
            await anyio.sleep(1.5)  # PgBouncer's idle_transaction_timeout is 1 s
        await conn.execute("SELECT 1")
        return attempts

    transaction_result: list[int] = []

    async def run_transaction(pool: ResilientPool) -> None:
        await anyio.sleep(0.3)
        transaction_result.append(await pool.run_transaction(idle_once))

    with anyio.fail_after(25):
        async with (
            _bouncer(pg, pool_mode, fault.settings) as bouncer,
            pool_for(
                bouncer.dsn, app_name, min_size=READERS + 1, max_size=12, heartbeat_timeout=2.0
            ) as pool,
        ):
            await pool.fetchval("SELECT 1")
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                for n in range(READERS):
                    tg.start_soon(_reader, pool, n, stop, tally, fault.reader_pause)
                tg.start_soon(_writer, pool, table, stop, tally)
                if fault.idle_in_transaction:
                    tg.start_soon(run_transaction, pool)
                if fault.inject is not None:
                    tg.start_soon(fault.inject, bouncer)
                await anyio.sleep(RUN_FOR)
                stop.set()
            stats = pool.stats
            log = bouncer.log_path.read_text()
        keys = await _keys(pg, table)
    reasons = {
        line.split("closing because: ")[-1]
        for line in log.splitlines()
        if "closing because: " in line
    }

    assert tally.read_errors == []
    assert tally.wrong == 0
    assert tally.reads >= READERS * 2
    assert tally.write_errors == []
    assert tally.acked
    assert all(keys.get(key) == 1 for key in tally.acked), "an acknowledged write is missing"
    assert all(n == 1 for n in keys.values()), "a write was doubled"
    assert stats.commits_unknown == 0
    if fault.idle_in_transaction:
        assert transaction_result == [2]  # the first attempt was cut, the second committed
        assert keys.get("rt") == 1
        assert (await pg.execute(f"SELECT v FROM {table} WHERE k = 'rt'")) == [(2,)]
    if fault.cuts_clients:
        assert stats.connections_lost >= 1, stats
    if fault.holds_reads:
        assert tally.slowest_read >= 0.5, tally.slowest_read
    if fault.logged:  # the fault did happen
        assert any(text in reason for text in fault.logged for reason in reasons), reasons


# -- 4. PgBouncer's own error, classified on the real thing --------------------------------


@pytest.mark.slow
async def test_query_wait_timeout_is_retryable(pg: PostgresServer, app_name: str) -> None:
    """With query_wait_timeout = 1 s and PgBouncer paused for 2.5 s, a raw psycopg query gets
    PgBouncer's FATAL 08P01 "query_wait_timeout", which `classify` calls retryable; the
    pool's reads during the same PAUSE wait and are retried, and none fails."""
    tally = Tally()
    with anyio.fail_after(30):
        async with (
            _bouncer(pg, "transaction", {"query_wait_timeout": "1"}) as bouncer,
            await psycopg.AsyncConnection.connect(
                bouncer.dsn, autocommit=True, prepare_threshold=None
            ) as raw,
            pool_for(bouncer.dsn, app_name, max_size=4) as pool,
        ):
            await raw.execute("SELECT 1")
            await pool.fetchval("SELECT 1")
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                await bouncer.admin("PAUSE")
                paused_at = time.monotonic()
                try:
                    for n in range(4):
                        tg.start_soon(_reader, pool, n, stop, tally, 0.01)
                    with pytest.raises(psycopg.OperationalError) as info:
                        await raw.execute("SELECT 1")
                    await anyio.sleep(2.5 - (time.monotonic() - paused_at))
                finally:
                    await bouncer.admin("RESUME")
                await anyio.sleep(0.3)
                stop.set()
            stats = pool.stats

    exc = info.value
    assert exc.sqlstate == "08P01"
    assert "query_wait_timeout" in str(exc)
    assert raw.broken
    failure = classify(exc)
    assert failure in (Failure.CONNECTION, Failure.SERVER_BUSY)
    assert failure.retryable
    assert tally.read_errors == []
    assert tally.wrong == 0
    assert tally.slowest_read >= 2.0  # held through the whole PAUSE, across retries
    assert stats.retries >= 1, stats
