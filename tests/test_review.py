"""A skeptical review's attempts to make a write apply twice, get lost, be reported as
failed while applied (phantom), or hang, and to break the pool's accounting, with
everyday psycopg code: NOTIFY-only writes, raw COMMIT in blocks, autocommit blocks, the
caller's own query timeout, a statistics reset during a busy COMMIT, SET in a block,
pipelines, cancellation while resolving. Each failed before its fix; each asserts what
the contract (DESIGN.md guarantees 1-13) promises."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import psycopg
import pytest

from aiopg_resilient import CommitUnknown, ResilientPool
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import pool_for, until

Conn = psycopg.AsyncConnection[Any]


def _pool(dsn: str | None, app_name: str, **kwargs: Any) -> ResilientPool:
    assert dsn is not None
    kwargs.setdefault("max_size", 2)
    kwargs.setdefault("heartbeat_timeout", 0.5)
    return pool_for(dsn, app_name, **kwargs)


async def _count(pg: PostgresServer, table: str) -> int:
    return int((await pg.execute(f"SELECT count(*) FROM {table}"))[0][0])


def _clean(pool: ResilientPool) -> None:
    s = pool.stats
    assert s.in_use == 0, s
    assert s.size == s.idle, s


# -- 1. NOTIFY-only transaction: its xid is assigned at COMMIT, after XID_QUERY ---------


async def test_notify_only_execute_commit_never_arrives_is_not_success(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """A NOTIFY-only transaction gets its xid at COMMIT, so XID_QUERY sees none and the
    layer thinks it 'wrote nothing'. If the COMMIT never reaches the server the
    notification is never sent, yet execute() reports success: a lost write."""
    channel = f"ch_{app_name}"
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as listener:
        await listener.execute(f"LISTEN {channel}")
        async with _pool(tls_chaos_proxy.dsn, app_name) as pool:
            await pool.fetchval("SELECT 1")
            tls_chaos_proxy.on_client_message(b"COMMIT", "cut_before")
            outcome: object
            with anyio.fail_after(8):
                try:
                    outcome = await pool.execute(f"NOTIFY {channel}, 'job-1'")
                except Exception as exc:
                    outcome = exc
        got: list[str] = []
        with anyio.move_on_after(1.0):
            async for n in listener.notifies():
                got.append(n.payload)
                break
    # Either the notification was delivered, or the caller was told it was not / unknown.
    assert got == ["job-1"] or isinstance(outcome, Exception), (outcome, got)


# -- 2. autocommit connection() blocks: "nothing was committed" is a guess ------------


async def test_autocommit_block_loss_does_not_claim_nothing_committed(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """connect_kwargs autocommit=True makes connection() blocks autocommit: every
    statement commits on its own. A connection lost afterwards must not be reported as
    'nothing was committed' (guarantee 13): CommitUnknown, which says what stands."""
    async with _pool(pg.dsn, app_name, connect_kwargs={"autocommit": True}) as pool:
        with anyio.fail_after(8):
            with pytest.raises(CommitUnknown) as info:
                async with pool.connection() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
                    await pg.terminate_backends(app_name)
                    await conn.execute("SELECT 1")
        _clean(pool)
    assert await _count(pg, table) == 1
    assert "nothing was committed" not in str(info.value), str(info.value)


async def test_autocommit_block_user_transaction_commit_lost(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """Guarantee 9: inside connection(), a user's conn.transaction() never COMMITs on its
    own. With autocommit=True in connect_kwargs it does, outside the in-doubt protocol:
    a lost answer becomes ConnectionLost('nothing was committed') though it committed."""
    async with _pool(tls_chaos_proxy.dsn, app_name, connect_kwargs={"autocommit": True}) as pool:
        await pool.fetchval("SELECT 1")
        tls_chaos_proxy.on_client_message(b"COMMIT", "cut_after")
        outcome: object = None
        with anyio.fail_after(8):
            try:
                async with pool.connection() as conn, conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
            except Exception as exc:
                outcome = exc
    applied = await _count(pg, table)
    assert applied == 1
    # committed: success or CommitUnknown; never an error saying nothing was applied.
    assert outcome is None or isinstance(outcome, CommitUnknown), repr(outcome)


# -- 3. raw SQL COMMIT inside blocks -------------------------------------------------------


async def test_raw_commit_in_run_transaction_is_not_rerun(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """conn.commit() is refused in run_transaction, but conn.execute('COMMIT') is not:
    it commits, and a connection loss later makes the layer re-run fn as if nothing was
    applied: the row is written twice (guarantee 2)."""
    calls = 0

    async def fn(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
        await conn.execute("COMMIT")
        if calls == 1:
            await pg.terminate_backends(app_name)
        await conn.execute("SELECT 1")

    async with _pool(pg.dsn, app_name) as pool:
        with anyio.fail_after(8):
            with contextlib.suppress(Exception):
                await pool.run_transaction(fn)
        _clean(pool)
    assert await _count(pg, table) == 1, f"fn ran {calls} times"


async def test_raw_commit_in_transaction_block_loss_is_not_phantom(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """transaction(): after a raw COMMIT, a lost connection is reported as 'nothing was
    applied/committed' although the row is there (guarantee 13)."""
    async with _pool(pg.dsn, app_name) as pool:
        with anyio.fail_after(8):
            with pytest.raises(psycopg.ProgrammingError, match="COMMIT or ROLLBACK") as info:
                async with pool.transaction() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
                    await conn.execute("COMMIT")
                    await pg.terminate_backends(app_name)
                    await conn.execute("SELECT 1")
        _clean(pool)
    assert await _count(pg, table) == 1
    assert "nothing was" not in str(info.value), str(info.value)


# -- 4. the caller's own timeout around a query (guarantee 10) -------------------------


async def test_user_query_timeout_in_run_transaction_is_not_rerun(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """A timeout of the caller's own (fail_after around a slow query) inside fn is the
    caller's error: raised unchanged, fn not re-run, no connection counted lost."""
    calls = 0

    async def fn(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
        with anyio.fail_after(0.2):
            await conn.execute("SELECT pg_sleep(2)")

    async with _pool(pg.dsn, app_name) as pool:
        outcome: object = None
        with anyio.fail_after(9):
            try:
                await pool.run_transaction(fn)
            except BaseException as exc:
                outcome = exc
        stats = pool.stats
    assert calls == 1, (calls, repr(outcome), stats)
    assert isinstance(outcome, TimeoutError), (calls, repr(outcome), stats)
    assert stats.connections_lost == 0, stats


async def test_user_query_timeout_in_transaction_block_is_callers(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """Same in transaction(): the user's TimeoutError must reach the caller unchanged,
    not as ConnectionLost."""
    async with _pool(pg.dsn, app_name) as pool:
        outcome: object = None
        with anyio.fail_after(8):
            try:
                async with pool.transaction() as conn:
                    with anyio.fail_after(0.2):
                        await conn.execute("SELECT pg_sleep(2)")
            except BaseException as exc:
                outcome = exc
        stats = pool.stats
    assert isinstance(outcome, TimeoutError), repr(outcome)
    assert stats.connections_lost == 0, stats


# -- 5. the crash marker is a statistic anyone with pg_stat_reset_shared can move ------


async def test_stats_reset_during_busy_commit_doubles_the_write(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """decide() takes any change of pg_stat_bgwriter.stats_reset for crash recovery, and
    then reads 'in progress' as ABORTED. A monitoring job running
    pg_stat_reset_shared('bgwriter') while a COMMIT is busy (a deferred trigger waiting
    on a lock, a synchronous-replication wait) makes execute() re-run a write whose
    first COMMIT then completes: applied twice."""
    await pg.execute(
        f"CREATE FUNCTION f_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF pg_try_advisory_xact_lock(7001) THEN PERFORM pg_advisory_xact_lock(7002); END IF; "
        "RETURN NULL; END $$"
    )
    await pg.execute(
        f"CREATE CONSTRAINT TRIGGER trg_{table} AFTER INSERT ON {table} "
        f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION f_{table}()"
    )
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as gate:
        await gate.execute("SELECT pg_advisory_lock(7002)")  # the first COMMIT blocks here
        outcome: list[object] = []
        async with _pool(pg.dsn, app_name) as pool:

            async def write() -> None:
                try:
                    outcome.append(await pool.execute(f"INSERT INTO {table} VALUES ('a', 1)"))
                except Exception as exc:
                    outcome.append(exc)

            with anyio.fail_after(9):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(write)
                    # Wait until the COMMIT is busy (waiting for the advisory lock).
                    while not await pg.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                        "AND query = 'COMMIT' AND wait_event_type = 'Lock'",
                        (app_name,),
                    ):
                        await anyio.sleep(0.05)
                    await pg.execute("SELECT pg_stat_reset_shared('bgwriter')")
                    await anyio.sleep(2.0)  # > 3 x heartbeat_timeout: the watcher looked
                    assert outcome == []  # still waiting for the busy COMMIT
                    await gate.execute("SELECT pg_advisory_unlock(7002)")
        # let the first backend finish its COMMIT
        await anyio.sleep(0.5)
    rows = await _count(pg, table)
    assert rows == 1, f"rows={rows} execute() returned {outcome!r}"
    assert outcome == [1]


# -- 6. cancelled while resolving ------------------------------------------------------


async def test_cancel_during_resolution_is_commit_unknown(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """A caller cancelled while COMMIT is out gets CommitUnknown; one cancelled a moment
    later, while the layer resolves the lost answer, gets a bare TimeoutError, which
    reads as 'the request failed' although the row is committed (guarantee 13)."""
    async with _pool(tls_chaos_proxy.dsn, app_name) as pool:
        await pool.fetchval("SELECT 1")
        await until(lambda: tls_chaos_proxy.stats.open == 1)
        tls_chaos_proxy.refuse()  # resolution cannot connect for now
        try:
            tls_chaos_proxy.on_client_message(b"COMMIT", "cut_after")
            outcome: object = None
            try:
                with anyio.fail_after(1.5):
                    await pool.execute(f"INSERT INTO {table} VALUES ('a', 1)")
            except BaseException as exc:
                outcome = exc
        finally:
            tls_chaos_proxy.accept()
        _clean(pool)
    assert await _count(pg, table) == 1
    assert isinstance(outcome, CommitUnknown), repr(outcome)


# -- 7. session state set with SQL reaches the next borrower ---------------------------


async def test_session_set_does_not_reach_next_borrower(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """Guarantee 11: what a borrower set is undone. SET ... in a connection() block
    (committed with the block) stays on the pooled session: the next borrower's write
    fails as read-only."""
    async with _pool(pg.dsn, app_name, max_size=1) as pool:
        with anyio.fail_after(8):
            async with pool.connection() as conn:
                await conn.execute("SET default_transaction_read_only = on")
            outcome: object = None
            try:
                outcome = await pool.execute(f"INSERT INTO {table} VALUES ('a', 1)")
            except Exception as exc:
                outcome = exc
    assert outcome == 1, repr(outcome)


def test_reset_hook_of_the_contract_exists() -> None:
    """DESIGN.md: ResilientPool(..., reset=None) and open(wait=True, timeout=...)."""
    ResilientPool("", reset=None)


# -- 8. the layer's queries under a non-superuser role -----------------------------------


async def test_execute_as_ordinary_role(pg: PostgresServer, app_name: str, table: str) -> None:
    """Production apps do not connect as superuser: the in-doubt queries must work for
    an ordinary role."""
    role = f"r_{app_name}"
    await pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        await pg.execute(f"GRANT ALL ON {table} TO {role}")
        dsn = pg.conninfo(user=role, password="pw")
        async with _pool(dsn, app_name) as pool:
            with anyio.fail_after(8):
                assert await pool.execute(f"INSERT INTO {table} VALUES ('a', 1)") == 1
    finally:
        await pg.execute(f"DROP OWNED BY {role}")
        await pg.execute(f"DROP ROLE {role}")


# -- 9. a multi-statement text that ends the transaction itself ---------------------------


async def test_execute_script_with_commit_is_not_doubled(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """execute() glues BEGIN, the text and XID_QUERY into one simple query. A text that
    commits itself ('...; COMMIT') commits inside that round trip; a loss of its answer
    is taken for 'COMMIT never sent' and the text is re-run: applied twice."""
    async with _pool(tls_chaos_proxy.dsn, app_name) as pool:
        await pool.fetchval("SELECT 1")
        tls_chaos_proxy.on_client_message(b"COMMIT", "cut_after")
        with anyio.fail_after(8):
            with contextlib.suppress(Exception):
                await pool.execute(f"INSERT INTO {table} VALUES ('a', 1); COMMIT")
    assert await _count(pg, table) == 1


# -- 10. conn.commit() inside conn.pipeline() in a connection() block -------------------


async def test_pipeline_commit_answer_lost(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """Guarantee 9: conn.commit() inside conn.pipeline() in a connection() block is
    refused (its outcome could not be resolved): a clear ProgrammingError, nothing
    applied, never a COMMIT that escapes the protocol."""
    async with _pool(tls_chaos_proxy.dsn, app_name) as pool:
        await pool.fetchval("SELECT 1")
        tls_chaos_proxy.on_client_message(b"COMMIT", "cut_after")
        outcome: object = None
        with anyio.fail_after(8):
            try:
                async with pool.connection() as conn, conn.pipeline():
                    await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
                    await conn.commit()
            except Exception as exc:
                outcome = exc
        _clean(pool)
    applied = await _count(pg, table)
    assert applied == 0, (applied, repr(outcome))
    assert isinstance(outcome, psycopg.ProgrammingError), repr(outcome)
    assert "pipeline" in str(outcome)


# -- 11. cancelled during a user's conn.commit() in connection() --------------------------


async def test_cancel_during_user_commit_in_connection_block(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """Cancelled while a user's conn.commit() is out, the layer raises CommitUnknown; the
    connection() block then turns it into ConnectionLost('nothing was committed'),
    although the server committed (freeze_after: the answer is held)."""
    async with _pool(tls_chaos_proxy.dsn, app_name, heartbeat_timeout=5.0) as pool:
        await pool.fetchval("SELECT 1")
        tls_chaos_proxy.on_client_message(b"COMMIT", "freeze_after")
        outcome: object = None
        try:
            with anyio.fail_after(1.0):
                async with pool.connection() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
                    await conn.commit()
        except BaseException as exc:
            outcome = exc
        tls_chaos_proxy.thaw()
        _clean(pool)
    assert await _count(pg, table) == 1
    assert isinstance(outcome, CommitUnknown), repr(outcome)


# -- 12. a synchronous-replication stall: how long does execute() take? -----------------


async def test_sync_replication_stall_waits_for_the_callers_deadline(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """Guarantee 13 (issue 7): with synchronous_standby_names naming a standby that is
    not there, COMMIT waits: the layer never cuts it (not at heartbeat_timeout, not at
    retry.timeout); the caller's own deadline gives CommitUnknown, never success."""
    from aiopg_resilient import RetryPolicy

    await pg.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody_here'")
    await pg.execute("SELECT pg_reload_conf()")
    try:
        await anyio.sleep(0.3)
        async with _pool(pg.dsn, app_name, retry=RetryPolicy(timeout=1.0)) as pool:
            start = anyio.current_time()
            with pytest.raises(CommitUnknown) as caught, anyio.move_on_after(3):
                await pool.execute(f"INSERT INTO {table} VALUES ('a', 1)")
            took = anyio.current_time() - start
            _clean(pool)
    finally:
        await pg.execute("ALTER SYSTEM RESET synchronous_standby_names")
        await pg.execute("SELECT pg_reload_conf()")
        await anyio.sleep(0.3)
    assert caught.value.xid is not None
    assert took >= 2.9


# -- 13. a terminated backend's FATAL arrives as the answer to COMMIT -------------------


async def test_run_transaction_backend_terminated_before_commit_arrives(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """Guarantee 1: run_transaction surfaces no error for a terminated backend. The
    backend is terminated while its COMMIT is held on the wire; the COMMIT's 'answer' is
    the FATAL 57P01. Proven not applied -> fn should be re-run and succeed."""
    calls = 0

    async def fn(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")

    async with _pool(tls_chaos_proxy.dsn, app_name, heartbeat_timeout=5.0) as pool:
        await pool.fetchval("SELECT 1")
        trigger = tls_chaos_proxy.on_client_message(b"COMMIT", "freeze_before")
        outcome: object = "ok"
        with anyio.fail_after(9):
            async with anyio.create_task_group() as tg:

                async def run() -> None:
                    nonlocal outcome
                    try:
                        await pool.run_transaction(fn)
                    except Exception as exc:
                        outcome = exc

                tg.start_soon(run)
                await trigger.wait()
                await pg.terminate_backends(app_name)
                await anyio.sleep(0.3)
                tls_chaos_proxy.thaw()
        _clean(pool)
    rows = await _count(pg, table)
    assert (outcome, rows) == ("ok", 1), (repr(outcome), rows, calls)
