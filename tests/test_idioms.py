"""Everyday psycopg idioms through the pool's public calls (guarantees 9, 10, 11).

Users bring the code they already write for psycopg: a ``row_factory`` on the pool,
``async with conn.transaction():`` inside a block, ``conn.commit()`` in batches inside
``connection()``, their own HTTP calls and timeouts inside ``run_transaction``, a
connection configured read-only. Each test runs it against the real server, with real
faults from the TLS-terminating proxy where a fault is the point, and asserts what the
user sees: the rows in the table, the exception, how many times a function ran and the
pool's counters.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import anyio
import psycopg
import pytest
from psycopg.rows import class_row, dict_row, namedtuple_row, tuple_row

from aiopg_resilient import CommitUnknown, ConnectionLost, ResilientPool
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import pool_for

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

# The four ways users hand the pool a write.
ENTRIES = ["execute", "transaction", "run_transaction", "connection"]
# The three that give the user a connection to run their own code on.
BLOCKS = ["transaction", "run_transaction", "connection"]


# -- helpers ------------------------------------------------------------------------------


@dataclass
class Kv:
    """A row of the test table, for ``class_row``."""

    k: str
    v: int


def scalar_row(cursor: Any) -> Callable[[Sequence[Any]], Any]:
    """A scalar-like row factory, as users write them: each row is its first value."""

    def make(values: Sequence[Any]) -> Any:
        return values[0]

    return make


FACTORIES: dict[str, Any] = {
    "dict_row": dict_row,
    "namedtuple_row": namedtuple_row,
    "class_row": class_row(Kv),
    "scalar_row": scalar_row,
}


def describe(row: Any) -> tuple[str, Any]:
    """What kind of row this is and what it holds, comparable across factories."""
    if isinstance(row, dict):
        return ("dict", dict(row))
    if isinstance(row, tuple) and hasattr(row, "_asdict"):
        return ("namedtuple", dict(row._asdict()))
    if isinstance(row, tuple):
        return ("tuple", row)
    if isinstance(row, Kv):
        return ("Kv", asdict(row))
    return ("scalar", row)


def expected(factory: str, k: str, v: int) -> tuple[str, Any]:
    """`describe` of the row ``(k, v)`` of the test table under *factory*."""
    if factory == "scalar_row":
        return ("scalar", k)
    kind = {"dict_row": "dict", "namedtuple_row": "namedtuple", "class_row": "Kv"}[factory]
    return (kind, {"k": k, "v": v})


def _pool(dsn: str | None, app_name: str, **kwargs: Any) -> ResilientPool:
    assert dsn is not None
    kwargs.setdefault("max_size", 2)
    return pool_for(dsn, app_name, heartbeat_timeout=0.5, **kwargs)


async def _count(pg: PostgresServer, table: str) -> int:
    return int((await pg.execute(f"SELECT count(*) FROM {table}"))[0][0])


async def _keys(pg: PostgresServer, table: str) -> list[str]:
    return [row[0] for row in await pg.execute(f"SELECT k FROM {table} ORDER BY k")]


async def in_block(pool: ResilientPool, entry: str, body: Callable[[Conn], Awaitable[T]]) -> T:
    """Run *body* the way a user would through *entry* (one of BLOCKS)."""
    if entry == "transaction":
        async with pool.transaction() as conn:
            return await body(conn)
    if entry == "connection":
        async with pool.connection() as conn:
            return await body(conn)
    assert entry == "run_transaction"
    return await pool.run_transaction(body)


def _closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _http_timeout() -> None:
    """A call to another service that timed out (the user's own deadline)."""
    with anyio.fail_after(0.01):
        await anyio.sleep(5)


async def _http_refused() -> None:
    """A call to another service that is down."""
    _, writer = await asyncio.open_connection("127.0.0.1", _closed_port())
    writer.close()  # pragma: no cover - the port is closed


async def _os_error() -> None:
    raise OSError(errno.EPIPE, "Broken pipe (writing to the cache)")


async def _value_error() -> None:
    raise ValueError("invalid order quantity")


USER_ERRORS: dict[str, tuple[type[BaseException], Callable[[], Awaitable[None]]]] = {
    "TimeoutError": (TimeoutError, _http_timeout),
    "ConnectionRefusedError": (ConnectionRefusedError, _http_refused),
    "OSError": (OSError, _os_error),
    "ValueError": (ValueError, _value_error),
}


# -- guarantee 11: row factories ------------------------------------------------------------


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("entry", ENTRIES)
async def test_writes_commit_under_row_factory(
    pg: PostgresServer, app_name: str, table: str, entry: str, factory: str
) -> None:
    """Guarantee 11: every write entry point commits whatever row_factory the pool has."""
    calls = 0

    async def body(conn: Conn) -> str:
        nonlocal calls
        calls += 1
        await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
        cur = await conn.execute(f"SELECT k, v FROM {table} WHERE k = 'a'")
        assert describe(await cur.fetchone()) == expected(factory, "a", 1)
        return "done"

    async with _pool(pg.dsn, app_name, connect_kwargs={"row_factory": FACTORIES[factory]}) as pool:
        with anyio.fail_after(5):
            if entry == "execute":
                assert await pool.execute(f"INSERT INTO {table} VALUES ('a', 1)") == 1
            else:
                assert await in_block(pool, entry, body) == "done"
                assert calls == 1
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 1
        assert pool.stats.retries == 0
    assert await _count(pg, table) == 1


@pytest.mark.parametrize("factory", FACTORIES)
async def test_reads_follow_row_factory_and_fetchval_is_plain(
    pg: PostgresServer, app_name: str, table: str, factory: str
) -> None:
    """Guarantee 11: fetch/fetchone rows are shaped by the user's row_factory; fetchval is
    the plain first-column value whatever the row_factory."""
    await pg.execute(f"INSERT INTO {table} VALUES ('a', 1), ('b', 2)")
    async with _pool(pg.dsn, app_name, connect_kwargs={"row_factory": FACTORIES[factory]}) as pool:
        with anyio.fail_after(5):
            rows = await pool.fetch(f"SELECT k, v FROM {table} ORDER BY k")
            assert [describe(r) for r in rows] == [
                expected(factory, "a", 1),
                expected(factory, "b", 2),
            ]
            row = await pool.fetchone(f"SELECT k, v FROM {table} WHERE k = %s", ("b",))
            assert describe(row) == expected(factory, "b", 2)
            assert await pool.fetchone(f"SELECT k, v FROM {table} WHERE k = 'zz'") is None
            assert await pool.fetchval("SELECT 'abc'") == "abc"
            assert await pool.fetchval("SELECT 42, 'x'") == 42
            assert await pool.fetchval(f"SELECT v FROM {table} WHERE k = %s", ("b",)) == 2
            assert await pool.fetchval(f"SELECT k, v FROM {table} WHERE k = 'a'") == "a"
            assert await pool.fetchval(f"SELECT v FROM {table} WHERE k = 'zz'") is None


@pytest.mark.parametrize("factory", FACTORIES)
async def test_write_path_fetchone_follows_row_factory(
    pg: PostgresServer, app_name: str, table: str, factory: str
) -> None:
    """Guarantee 11: fetchone(..., idempotent=False) returns the row shaped by the user's
    row_factory, and fetchval(..., idempotent=False) the plain value."""
    async with _pool(pg.dsn, app_name, connect_kwargs={"row_factory": FACTORIES[factory]}) as pool:
        with anyio.fail_after(5):
            row = await pool.fetchone(
                f"INSERT INTO {table} VALUES (%s, 5) RETURNING k, v", ("r",), idempotent=False
            )
            assert describe(row) == expected(factory, "r", 5)
            value = await pool.fetchval(
                f"INSERT INTO {table} VALUES ('s', 6) RETURNING v", idempotent=False
            )
            assert value == 6
    assert await _keys(pg, table) == ["r", "s"]


@pytest.mark.parametrize("factory", ["dict_row", "scalar_row"])
@pytest.mark.parametrize("entry", [*ENTRIES, "fetchone_write"])
async def test_commit_cut_resolved_under_row_factory(
    pg: PostgresServer,
    tls_chaos_proxy: ChaosProxy,
    app_name: str,
    table: str,
    entry: str,
    factory: str,
) -> None:
    """Guarantee 11 (with 2): a COMMIT whose answer is lost is resolved as committed under
    the user's row_factory: no error, no re-run, the row is there exactly once."""
    calls = 0

    async def body(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")

    kwargs = {"row_factory": FACTORIES[factory]}
    async with _pool(tls_chaos_proxy.dsn, app_name, connect_kwargs=kwargs) as pool:
        await pool.fetchval("SELECT 1")
        trigger = tls_chaos_proxy.on_client_message(b"COMMIT", "cut_after")
        with anyio.fail_after(10):
            if entry == "execute":
                assert await pool.execute(f"INSERT INTO {table} VALUES ('a', 1)") == 1
            elif entry == "fetchone_write":
                row = await pool.fetchone(
                    f"INSERT INTO {table} VALUES ('a', 1) RETURNING k, v", idempotent=False
                )
                assert describe(row) == expected(factory, "a", 1)
            else:
                await in_block(pool, entry, body)
                assert calls == 1
        assert trigger.count == 1
        assert pool.stats.commits_resolved == 1
        assert pool.stats.commits_unknown == 0
        assert pool.stats.retries == 0
    assert await _count(pg, table) == 1


async def _set_row_factory(conn: Conn) -> None:
    conn.row_factory = dict_row
    cur = await conn.execute("SELECT 1 AS one")
    assert await cur.fetchone() == {"one": 1}


async def _set_cursor_factory(conn: Conn) -> None:
    conn.cursor_factory = psycopg.AsyncRawCursor
    cur = await conn.execute("SELECT $1::int", (7,))
    assert await cur.fetchone() == (7,)


async def _set_read_only(conn: Conn) -> None:
    await conn.set_read_only(True)
    cur = await conn.execute("SHOW transaction_read_only")
    assert await cur.fetchone() == ("on",)


async def _set_isolation_level(conn: Conn) -> None:
    await conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
    cur = await conn.execute("SHOW transaction_isolation")
    assert await cur.fetchone() == ("serializable",)


SETTINGS: dict[str, Callable[[Conn], Awaitable[None]]] = {
    "row_factory": _set_row_factory,
    "cursor_factory": _set_cursor_factory,
    "read_only": _set_read_only,
    "isolation_level": _set_isolation_level,
}


@pytest.mark.parametrize("setting", SETTINGS)
async def test_borrowed_connection_comes_back_clean(
    pg: PostgresServer, app_name: str, table: str, setting: str
) -> None:
    """Guarantee 11: what a connection() block set on the connection (row_factory,
    cursor_factory, read_only, isolation level) is undone before the next borrower."""
    async with _pool(pg.dsn, app_name, min_size=1, max_size=1) as pool:
        with anyio.fail_after(5):
            async with pool.connection() as conn:
                await SETTINGS[setting](conn)
            # The same single connection serves the pool's own queries...
            assert await pool.execute(f"INSERT INTO {table} VALUES (%s, 1)", ("a",)) == 1
            assert await pool.fetchval(f"SELECT count(*) FROM {table} WHERE k = %s", ("a",)) == 1
            assert await pool.fetchone("SELECT 1, 2") == (1, 2)
            # ...and the next borrower finds the pool's own settings.
            async with pool.connection() as conn:
                assert conn.row_factory is tuple_row
                assert conn.cursor_factory is psycopg.AsyncCursor
                assert conn.read_only is None
                assert conn.isolation_level is None
                cur = await conn.execute(
                    "SELECT current_setting('transaction_read_only'),"
                    " current_setting('transaction_isolation')"
                )
                assert await cur.fetchone() == ("off", "read committed")
                await conn.execute(f"INSERT INTO {table} VALUES (%s, 2)", ("b",))
        assert pool.stats.connections_lost == 0
    assert await _keys(pg, table) == ["a", "b"]


async def test_pool_row_factory_restored_after_user_change(
    pg: PostgresServer, app_name: str
) -> None:
    """Guarantee 11: a block's own row_factory gives way to the pool's configured one."""
    kwargs = {"row_factory": namedtuple_row}
    async with _pool(pg.dsn, app_name, min_size=1, max_size=1, connect_kwargs=kwargs) as pool:
        with anyio.fail_after(5):
            async with pool.connection() as conn:
                conn.row_factory = dict_row
                await conn.execute("SELECT 1")
            row = await pool.fetchone("SELECT 1 AS k, 2 AS v")
            assert describe(row) == ("namedtuple", {"k": 1, "v": 2})
            async with pool.connection() as conn:
                assert conn.row_factory is namedtuple_row


# -- guarantee 9: the layer owns the transaction ---------------------------------------------


@pytest.mark.parametrize("entry", BLOCKS)
async def test_user_savepoint_is_undone_with_the_block(
    pg: PostgresServer, app_name: str, table: str, entry: str
) -> None:
    """Guarantee 9: a user's conn.transaction() is a savepoint: when the block then fails,
    nothing of it is in the table."""
    calls = 0

    async def body(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
        await conn.execute(f"INSERT INTO {table} VALUES ('b', 2)")
        raise ValueError("the order is invalid after all")

    async with _pool(pg.dsn, app_name, min_size=1, max_size=1) as pool:
        with anyio.fail_after(5), pytest.raises(ValueError, match="invalid after all"):
            await in_block(pool, entry, body)
        assert calls == 1
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
    assert await _count(pg, table) == 0


@pytest.mark.parametrize("entry", BLOCKS)
async def test_user_savepoint_rolls_back_alone(
    pg: PostgresServer, app_name: str, table: str, entry: str
) -> None:
    """Guarantee 9: an error inside the user's conn.transaction() undoes only that
    savepoint; the rest of the block commits."""

    async def body(conn: Conn) -> None:
        await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES ('x', 9)")
                raise LookupError("skip this one")
        except LookupError:
            pass
        await conn.execute(f"INSERT INTO {table} VALUES ('b', 2)")

    async with _pool(pg.dsn, app_name) as pool:
        with anyio.fail_after(5):
            await in_block(pool, entry, body)
    assert await _keys(pg, table) == ["a", "b"]


@pytest.mark.parametrize("action", ["cut_after", "cut_before"])
@pytest.mark.parametrize("entry", BLOCKS)
async def test_user_savepoint_then_commit_fault(
    pg: PostgresServer,
    tls_chaos_proxy: ChaosProxy,
    app_name: str,
    table: str,
    entry: str,
    action: str,
) -> None:
    """Guarantee 9: a block using conn.transaction() has one COMMIT, the layer's, and it
    goes through the in-doubt protocol: the row is never doubled nor claimed lost."""
    calls = 0

    async def body(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")

    async with _pool(tls_chaos_proxy.dsn, app_name) as pool:
        await pool.fetchval("SELECT 1")
        trigger = tls_chaos_proxy.on_client_message(b"COMMIT", action)  # type: ignore[arg-type]
        with anyio.fail_after(10):
            if action == "cut_after":
                await in_block(pool, entry, body)
                assert calls == 1
            elif entry == "run_transaction":
                await in_block(pool, entry, body)
                assert calls == 2
            else:
                with pytest.raises(ConnectionLost):
                    await in_block(pool, entry, body)
                assert calls == 1
        assert trigger.count == 1
        assert pool.stats.commits_unknown == 0
    applied = action == "cut_after" or entry == "run_transaction"
    assert await _count(pg, table) == (1 if applied else 0)


@pytest.mark.parametrize("method", ["commit", "rollback"])
@pytest.mark.parametrize("entry", ["transaction", "run_transaction"])
async def test_bare_commit_or_rollback_is_refused(
    pg: PostgresServer, app_name: str, table: str, entry: str, method: str
) -> None:
    """Guarantee 9: conn.commit()/conn.rollback() inside transaction() or run_transaction()
    raise ProgrammingError; the function is not re-run and nothing of the block applies."""
    calls = 0

    async def body(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
        await getattr(conn, method)()
        await conn.execute(f"INSERT INTO {table} VALUES ('b', 2)")

    async with _pool(pg.dsn, app_name, min_size=1, max_size=1) as pool:
        with anyio.fail_after(5):
            with pytest.raises(psycopg.ProgrammingError):
                await in_block(pool, entry, body)
            assert calls == 1
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert pool.stats.connections_lost == 0
        assert pool.stats.retries == 0
    assert await _count(pg, table) == 0


async def test_connection_block_commits_in_batches(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """Guarantee 9: inside connection(), a user's conn.commit() works as in psycopg_pool:
    each batch commits, and a failure later rolls back only the open batch."""
    async with _pool(pg.dsn, app_name, min_size=1, max_size=1) as pool:
        with anyio.fail_after(5):
            async with pool.connection() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
                await conn.commit()
                await conn.execute(f"INSERT INTO {table} VALUES ('b', 2)")
            assert await _keys(pg, table) == ["a", "b"]
            with pytest.raises(ValueError, match="stop"):
                async with pool.connection() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES ('c', 3)")
                    await conn.commit()
                    await conn.execute(f"INSERT INTO {table} VALUES ('d', 4)")
                    raise ValueError("stop")
            assert await pool.fetchval("SELECT 1") == 1
        assert pool.stats.connections_lost == 0
    assert await _keys(pg, table) == ["a", "b", "c"]


async def test_connection_block_user_commit_answer_lost(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """Guarantee 9: a lost answer to a user's conn.commit() inside connection() is resolved
    (commit() returns, then the dead connection makes the block raise ConnectionLost) or
    CommitUnknown, never an error claiming nothing was committed; the row is there once."""
    commit_returned = False
    async with _pool(tls_chaos_proxy.dsn, app_name) as pool:
        await pool.fetchval("SELECT 1")
        trigger = tls_chaos_proxy.on_client_message(b"COMMIT", "cut_after")
        with anyio.fail_after(10):
            with pytest.raises((ConnectionLost, CommitUnknown)) as info:
                async with pool.connection() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
                    await conn.commit()
                    commit_returned = True
                    await conn.execute(f"INSERT INTO {table} VALUES ('b', 2)")
        assert trigger.count == 1
        if commit_returned:
            assert isinstance(info.value, ConnectionLost), info.value
            assert pool.stats.commits_resolved == 1
        else:
            assert isinstance(info.value, CommitUnknown), info.value
        message = str(info.value).lower()
        assert "nothing was committed" not in message
        assert "nothing was applied" not in message
        assert await pool.fetchval("SELECT 1") == 1
    assert await _keys(pg, table) == ["a"]


async def test_connection_block_user_commit_never_arrives(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """Guarantee 9: a user's conn.commit() inside connection() that never reached the
    server raises ConnectionLost and the row is not there."""
    async with _pool(tls_chaos_proxy.dsn, app_name) as pool:
        await pool.fetchval("SELECT 1")
        trigger = tls_chaos_proxy.on_client_message(b"COMMIT", "cut_before")
        with anyio.fail_after(10):
            with pytest.raises(ConnectionLost):
                async with pool.connection() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
                    await conn.commit()
                    await conn.execute(f"INSERT INTO {table} VALUES ('b', 2)")
            assert await pool.fetchval("SELECT 1") == 1
        assert trigger.count == 1
        assert pool.stats.commits_unknown == 0
    assert await _count(pg, table) == 0


# -- guarantee 10: the caller's errors are the caller's -------------------------------------


@pytest.mark.parametrize("error", USER_ERRORS)
@pytest.mark.parametrize("entry", BLOCKS)
async def test_user_error_reaches_caller_unchanged(
    pg: PostgresServer, app_name: str, table: str, entry: str, error: str
) -> None:
    """Guarantee 10: an exception from user code inside a block or run_transaction's fn
    (timeout, refused HTTP call, OSError, ValueError) reaches the caller unchanged, after
    rollback, without a re-run, and the connection is neither counted lost nor dropped."""
    kind, cause = USER_ERRORS[error]
    calls = 0
    raised: list[BaseException] = []

    async def body(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
        try:
            await cause()
        except Exception as exc:
            raised.append(exc)
            raise

    async with _pool(pg.dsn, app_name, min_size=1, max_size=1) as pool:
        with anyio.fail_after(5):
            await pool.fetchval("SELECT 1")
            before = pool.stats
            with pytest.raises(kind) as info:
                await in_block(pool, entry, body)
            assert calls == 1
            assert len(raised) == 1
            assert info.value is raised[0]
            after = pool.stats
            assert after.connections_lost == before.connections_lost
            assert after.retries == before.retries
            assert after.size == before.size
            assert after.connects == before.connects
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
            assert pool.stats.connects == before.connects
    assert await _count(pg, table) == 0


async def test_psycopg_error_from_users_own_connection_is_not_rerun(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """Guarantee 10: a psycopg OperationalError from another connection the user opened
    inside run_transaction's fn is not taken for a loss of the pool's: fn runs once."""
    calls = 0
    port = _closed_port()

    async def body(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")
        other = await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=port, dbname="audit", connect_timeout=2
        )
        await other.close()  # pragma: no cover - nothing listens there

    async with _pool(pg.dsn, app_name, min_size=1, max_size=1) as pool:
        with anyio.fail_after(5):
            with pytest.raises(psycopg.OperationalError):
                await pool.run_transaction(body)
            assert calls == 1
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert pool.stats.retries == 0
    assert await _count(pg, table) == 0


# -- read-only by the user's choice (error table: not a demoted primary) --------------------


async def _read_only_sessions(conn: Conn) -> None:
    await conn.execute("SET default_transaction_read_only = on")


@pytest.mark.parametrize("entry", ENTRIES)
async def test_configured_read_only_fails_fast(
    pg: PostgresServer, app_name: str, table: str, entry: str
) -> None:
    """Error table: a write on a session the user configured read-only raises
    ReadOnlySqlTransaction at once, not DatabaseUnavailable after a retry storm."""
    calls = 0

    async def body(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")

    async with _pool(pg.dsn, app_name, configure=_read_only_sessions) as pool:
        await pool.fetchval("SELECT 1")
        started = time.monotonic()
        with anyio.fail_after(2), pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            if entry == "execute":
                await pool.execute(f"INSERT INTO {table} VALUES ('a', 1)")
            else:
                await in_block(pool, entry, body)
        assert time.monotonic() - started < 1.0
        assert calls == (0 if entry == "execute" else 1)
        assert pool.stats.connections_lost == 0
        assert pool.stats.retries == 0
        assert await pool.fetchval("SELECT current_setting('default_transaction_read_only')") == (
            "on"
        )
    assert await _count(pg, table) == 0


@pytest.mark.parametrize("entry", BLOCKS)
async def test_set_transaction_read_only_fails_fast(
    pg: PostgresServer, app_name: str, table: str, entry: str
) -> None:
    """Error table: SET TRANSACTION READ ONLY then an INSERT in a block raises
    ReadOnlySqlTransaction at once, without a re-run or a lost connection."""
    calls = 0

    async def body(conn: Conn) -> None:
        nonlocal calls
        calls += 1
        await conn.execute("SET TRANSACTION READ ONLY")
        await conn.execute(f"INSERT INTO {table} VALUES ('a', 1)")

    async with _pool(pg.dsn, app_name) as pool:
        await pool.fetchval("SELECT 1")
        started = time.monotonic()
        with anyio.fail_after(2), pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await in_block(pool, entry, body)
        assert time.monotonic() - started < 1.0
        assert calls == 1
        assert pool.stats.connections_lost == 0
        assert pool.stats.retries == 0
        assert await pool.execute(f"INSERT INTO {table} VALUES ('b', 2)") == 1
    assert await _keys(pg, table) == ["b"]
