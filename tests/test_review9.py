"""A skeptical review of issue 9 (the silent-path watch, role awareness, pooler
detection): each test staged a way to kill a healthy query, hang, or mislabel; they stay
as regression tests (some adjusted: see the comments)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import anyio
import psycopg
import pytest

from aiopg_resilient import CommitUnknown, ResilientPool, RetryPolicy
from aiopg_resilient.testing import ChaosProxy, PostgresServer

from .conftest import backends, pool_for

PATIENCE = 0.5


# -- a small proxy of our own: bandwidth limit, and "hold everything after Parse" --------


class Pipe:
    """Plain TCP proxy in the test's own loop. *rate* bytes/s each way (None: no limit);
    *hold_after_parse*: once a Parse ('P') message containing it passes (plaintext
    only), the rest of that client's bytes are held (the server got Parse, not Bind)."""

    def __init__(
        self, port: int, *, rate: float | None = None, hold_after_parse: bytes | None = None
    ) -> None:
        self.upstream_port = port
        self.rate = rate
        self.hold_after_parse = hold_after_parse
        self.held = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._socks: list[socket.socket] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for w in self._writers:
            w.close()
        await asyncio.sleep(0.05)
        for sk in self._socks:
            sk.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sock = socket.socket()
        self._socks.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.upstream_port))
        ur, uw = await asyncio.open_connection(sock=sock, limit=16384)
        self._writers += [cw, uw]
        for coro in (self._up(cr, uw), self._pump(ur, cw)):
            t = asyncio.ensure_future(coro)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(4096 if self.rate else 65536):
                w.write(data)
                await w.drain()
                if self.rate:
                    await asyncio.sleep(len(data) / self.rate)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            w.close()

    async def _up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.hold_after_parse is None:
            return await self._pump(r, w)
        try:
            head = await r.readexactly(8)
            length, code = struct.unpack("!ii", head)
            if code in (80877103, 80877104):  # SSL / GSS request
                raise RuntimeError("use sslmode=disable gssencmode=disable")
            w.write(head + await r.readexactly(length - 8))  # startup message
            held = False
            while True:
                typ = await r.readexactly(1)
                ln = await r.readexactly(4)
                body = await r.readexactly(struct.unpack("!i", ln)[0] - 4)
                if held:
                    continue  # swallowed: the server never sees it
                w.write(typ + ln + body)
                await w.drain()
                if typ == b"P" and self.hold_after_parse in body and self.held == 0:
                    held = True
                    self.held += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            w.close()


# -- 1. the look misreads a healthy backend ----------------------------------------------


async def test_track_activities_off_kills_healthy_slow_read(
    pg: PostgresServer, app_name: str
) -> None:
    """track_activities = off (a documented tuning knob; here for the pool's sessions
    only): pg_stat_activity.state is 'disabled'. The look reads that as 'not working',
    terminates the healthy backend and re-runs the read, again and again."""
    dsn = pg.conninfo(options="-c track_activities=off")
    async with pool_for(
        dsn,
        app_name,
        min_size=1,
        max_size=2,
        heartbeat_timeout=PATIENCE,
        retry=RetryPolicy(timeout=4),
    ) as pool:
        started = time.monotonic()
        try:
            with anyio.fail_after(8):
                value = await pool.fetchval("SELECT 7 FROM pg_sleep(1.5)")
            outcome = f"ok {value}"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - started
        stats = pool.stats
    print(
        f"\n{outcome!r} after {elapsed:.2f}s; lost={stats.connections_lost} "
        f"retries={stats.retries} connects={stats.connects}"
    )
    assert outcome == "ok 7"
    assert stats.connections_lost == 0


async def test_track_activities_off_write_is_killed(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """The same for a write: terminated mid-statement, re-run, never finishing."""
    dsn = pg.conninfo(options="-c track_activities=off")
    async with pool_for(
        dsn,
        app_name,
        min_size=1,
        max_size=2,
        heartbeat_timeout=PATIENCE,
        retry=RetryPolicy(timeout=4),
    ) as pool:
        try:
            with anyio.fail_after(8):
                n = await pool.execute(f"INSERT INTO {table} SELECT 'a', 1 FROM pg_sleep(1.5)")
            outcome = f"ok {n}"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        stats = pool.stats
    rows = await pg.execute(f"SELECT count(*) FROM {table}")
    print(f"\n{outcome!r}; rows={rows[0][0]} lost={stats.connections_lost} retries={stats.retries}")
    assert outcome == "ok 1"


async def test_slow_download_is_not_a_silent_path(pg: PostgresServer, app_name: str) -> None:
    """A healthy but slow link (bandwidth-limited, bytes flowing all the time): a 3 MB
    result takes ~3 s. The backend waits in ClientWrite (TCP back-pressure), which the
    look takes for a silent path: terminated, re-run, never finishes."""
    pipe = Pipe(pg.port, rate=1_000_000)
    port = await pipe.start()
    try:
        dsn = pg.conninfo(host="127.0.0.1", port=port)
        async with pool_for(
            dsn,
            app_name,
            min_size=1,
            max_size=2,
            heartbeat_timeout=1.0,
            retry=RetryPolicy(timeout=8),
        ) as pool:
            started = time.monotonic()
            try:
                with anyio.fail_after(15):
                    rows = await pool.fetch(
                        "SELECT repeat('x', 1000) FROM generate_series(1, 3000)"
                    )
                outcome = f"ok {len(rows)}"
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {str(exc)[:200]}"
            elapsed = time.monotonic() - started
            stats = pool.stats
    finally:
        await pipe.close()
    print(
        f"\n{outcome!r} after {elapsed:.2f}s; lost={stats.connections_lost} retries={stats.retries}"
    )
    assert outcome == "ok 3000"


async def test_slow_upload_is_not_a_silent_path(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    """A 3 MB parameter over the same slow link: while it is being sent the backend is
    'idle' (it has not got the whole message): taken for a silent path."""
    pipe = Pipe(pg.port, rate=1_000_000)
    port = await pipe.start()
    try:
        dsn = pg.conninfo(host="127.0.0.1", port=port)
        async with pool_for(
            dsn,
            app_name,
            min_size=1,
            max_size=2,
            heartbeat_timeout=1.0,
            retry=RetryPolicy(timeout=8),
        ) as pool:
            started = time.monotonic()
            try:
                with anyio.fail_after(15):
                    n = await pool.execute(
                        f"INSERT INTO {table} VALUES (%s, 1)", ("y" * 3_000_000,)
                    )
                outcome = f"ok {n}"
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {str(exc)[:200]}"
            elapsed = time.monotonic() - started
            stats = pool.stats
    finally:
        await pipe.close()
    rows = await pg.execute(f"SELECT count(*) FROM {table}")
    print(
        f"\n{outcome!r} after {elapsed:.2f}s; rows={rows[0][0]} lost={stats.connections_lost} "
        f"retries={stats.retries}"
    )
    assert outcome == "ok 1"


# -- 2. the look misses a silent path ------------------------------------------------------


async def test_path_silent_between_parse_and_bind_hangs(pg: PostgresServer, app_name: str) -> None:
    """The path goes silent after the server got Parse but before Bind/Execute/Sync (one
    write of psycopg split by the freeze): the backend is 'active' waiting in ClientRead
    for us while we wait for it. The look calls that 'working' forever."""
    pipe = Pipe(pg.port, hold_after_parse=b"marker_parse_hold")
    port = await pipe.start()
    try:
        dsn = pg.conninfo(host="127.0.0.1", port=port, sslmode="disable", gssencmode="disable")
        async with pool_for(
            dsn,
            app_name,
            min_size=1,
            max_size=2,
            heartbeat_timeout=PATIENCE,
        ) as pool:
            await pool.wait(timeout=5)
            look: list[Any] = []
            started = time.monotonic()
            outcome = "deadline"

            async def spy() -> None:
                await anyio.sleep(3)
                look.extend(
                    await pg.execute(
                        "SELECT state, wait_event, left(query, 40) FROM pg_stat_activity "
                        "WHERE application_name = %s",
                        (app_name,),
                    )
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(spy)
                with anyio.move_on_after(6):
                    v = await pool.fetchval("SELECT %s::int /* marker_parse_hold */", (5,))
                    outcome = f"ok {v}"
                elapsed = time.monotonic() - started
            state = pool.stats
    finally:
        await pipe.close()
    print(f"\n{outcome} after {elapsed:.2f}s; held={pipe.held}; backends: {state}; {look}")
    assert outcome == "ok 5"
    assert elapsed < 4 * PATIENCE + 1


# -- 3. a write reported wrongly --------------------------------------------------------------


async def test_semicolon_in_a_parameter_is_commit_unknown(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    """A plain single INSERT whose *parameter* holds a ';' (a URL, a CSV line): on a
    silent path the ghost is terminated (nothing applied, proven), yet the text 'has
    several statements' so the caller gets CommitUnknown instead of a re-run."""
    assert tls_chaos_proxy.dsn is not None
    async with pool_for(
        tls_chaos_proxy.dsn, app_name, min_size=1, max_size=2, heartbeat_timeout=PATIENCE
    ) as pool:
        tls_chaos_proxy.on_client_message(f"INSERT INTO {table}".encode(), "freeze_after")
        try:
            with anyio.fail_after(10):
                n = await pool.execute(f"INSERT INTO {table} VALUES (%s, 1)", ("a;b",))
            outcome = f"ok {n}"
        except CommitUnknown as exc:
            outcome = f"CommitUnknown: {exc}"
    tls_chaos_proxy.thaw()
    rows = await pg.execute(f"SELECT count(*) FROM {table}")
    print(f"\n{outcome}\nrows={rows[0][0]}")
    assert outcome == "ok 1"
    assert rows[0][0] == 1


# -- 4. cost: the looks are connections outside max_size ----------------------------------


async def test_looks_open_connections_beyond_max_size(pg: PostgresServer, app_name: str) -> None:
    """8 slow healthy queries on a pool of max_size=8: each makes a new connection (TLS
    login, configure) every patience to look at itself. The server sees more backends of
    the pool than max_size, and the pool makes dozens of logins in a few seconds."""
    peak = 0
    async with pool_for(pg.dsn, app_name, min_size=8, max_size=8, heartbeat_timeout=0.3) as pool:
        await pool.wait(timeout=10)
        before = pool.stats.connects

        async def slow() -> None:
            assert await pool.fetchval("SELECT 1 FROM pg_sleep(3)") == 1

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, await backends(pg, app_name))
                await anyio.sleep(0.05)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                async with anyio.create_task_group() as inner:
                    for _ in range(8):
                        inner.start_soon(slow)
                tg.cancel_scope.cancel()
        extra = pool.stats.connects - before
    print(f"\npeak backends {peak} for max_size 8; {extra} logins made for 8 queries in 3 s")
    # One connection of the looker's own to the server, whatever the number of slow
    # statements; it is not one of the pool's (no login counted, no configure).
    assert peak <= 8 + 1
    assert extra == 0


# -- 5. role drift ---------------------------------------------------------------------------


async def test_write_to_a_standby_read_pool(pg_standby: Any, app_name: str) -> None:
    """A read pool on a hot standby (single host); a write sent to it by mistake. Plain
    psycopg says 25006 at once. Here?"""
    dsn = pg_standby.conninfo(application_name=app_name)
    events: list[str] = []
    async with ResilientPool(
        dsn,
        name=app_name,
        min_size=4,
        max_size=4,
        retry=RetryPolicy(timeout=3),
        on_event=lambda e: events.append(e.kind),
    ) as pool:
        await pool.wait(timeout=10)
        assert await pool.fetchval("SELECT pg_is_in_recovery()") is True
        started = time.monotonic()
        try:
            with anyio.fail_after(10):
                await pool.execute("CREATE TABLE nope (k int)")
            outcome = "ok"
        except Exception as exc:
            state = getattr(exc, "sqlstate", None)
            outcome = f"{type(exc).__name__} (sqlstate {state}): {str(exc)[:150]}"
        elapsed = time.monotonic() - started
        stats = pool.stats
    print(
        f"\n{outcome} after {elapsed:.2f}s; lost={stats.connections_lost} "
        f"connects={stats.connects} retries={stats.retries}"
    )
    assert elapsed < 1.0
    assert isinstance(outcome, str)
    assert "25006" in outcome


async def test_user_set_read_only_counts_as_a_loss(pg: PostgresServer, app_name: str) -> None:
    """A borrower's own SET default_transaction_read_only = on in connection(): the
    connection is dropped as 'lost' (a loss event, connections_lost, suspect)."""
    events: list[str] = []
    async with pool_for(
        pg.dsn, app_name, min_size=1, max_size=1, on_event=lambda e: events.append(e.kind)
    ) as pool:
        await pool.wait(timeout=5)
        async with pool.connection() as conn:
            await conn.execute("SET default_transaction_read_only = on")
        stats = pool.stats
        assert await pool.fetchval("SELECT 1") == 1
    print(f"\nevents={events}; lost={stats.connections_lost}")
    assert stats.connections_lost == 0


async def test_one_write_kills_a_read_pool_over_standbys(pg_standby: Any, app_name: str) -> None:
    """A read pool over two replicas (here the same standby listed twice), libpq's
    default target_session_attrs=any. One write sent to it by mistake sets wants_primary
    for good: every new connection asks for read-write, which no replica is; the idle
    connections were all dropped at once (standbys_too). Reads then fail."""
    p = pg_standby.port
    dsn = pg_standby.conninfo(host="127.0.0.1,127.0.0.1", port=f"{p},{p}")
    async with ResilientPool(
        dsn,
        name=app_name,
        min_size=2,
        max_size=4,
        retry=RetryPolicy(timeout=2),
    ) as pool:
        await pool.wait(timeout=10)
        assert await pool.fetchval("SELECT pg_is_in_recovery()") is True
        with pytest.raises(psycopg.Error) as mistake:
            with anyio.fail_after(10):
                await pool.execute("CREATE TABLE nope (k int)")
        reads: list[str] = []
        for _ in range(3):
            try:
                with anyio.fail_after(10):
                    reads.append(f"ok {await pool.fetchval('SELECT 1')}")
            except Exception as exc:
                reads.append(f"{type(exc).__name__}: {str(exc)[:160]}")
        stats = pool.stats
    print(f"\nmistake: {type(mistake.value).__name__}; reads after it: {reads}; size={stats.size}")
    assert reads == ["ok 1"] * 3


async def test_caller_deadline_during_the_look_leaks_nothing(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """Frozen path, the watcher is mid-look when the caller's deadline fires: no task
    left running, no extra backend, counts exact."""
    assert tls_chaos_proxy.dsn is not None
    async with pool_for(
        tls_chaos_proxy.dsn,
        app_name,
        min_size=1,
        max_size=2,
        heartbeat_timeout=PATIENCE,
        heartbeat_interval=None,
    ) as pool:
        await pool.wait(timeout=5)
        tls_chaos_proxy.on_client_message(b"marker_deadline", "freeze_after")
        for delay in (0.52, 0.55, 0.6, 0.7, 0.8):
            with anyio.move_on_after(delay):
                await pool.fetchval("SELECT 1 /* marker_deadline */")
            tls_chaos_proxy.thaw()
            tls_chaos_proxy.on_client_message(b"marker_deadline", "freeze_after")
        await anyio.sleep(1.0)
        watchers = [t for t in asyncio.all_tasks() if "_watch" in repr(t.get_coro())]
        stats = pool.stats
        n = await backends(pg, app_name)
    tls_chaos_proxy.thaw()
    print(f"\nwatchers left {watchers}; size={stats.size} in_use={stats.in_use} backends={n}")
    assert watchers == []
    assert stats.in_use == 0
    assert n <= stats.size


async def test_query_waiting_on_a_lock_is_not_killed(
    pg: PostgresServer, app_name: str, table: str
) -> None:
    await pg.execute(f"INSERT INTO {table} VALUES ('k', 0)")
    async with pool_for(
        pg.dsn, app_name, min_size=1, max_size=3, heartbeat_timeout=PATIENCE
    ) as pool:

        async def holder() -> None:
            async with pool.transaction() as conn:
                await conn.execute(f"UPDATE {table} SET v = v + 1")
                await anyio.sleep(2.0)

        async def other() -> None:
            await anyio.sleep(0.2)
            assert await pool.execute(f"UPDATE {table} SET v = v + 10") == 1

        with anyio.fail_after(8):
            async with anyio.create_task_group() as tg:
                tg.start_soon(holder)
                tg.start_soon(other)
        stats = pool.stats
    rows = await pg.execute(f"SELECT v FROM {table}")
    print(f"\nv={rows}; lost={stats.connections_lost}")
    assert rows[0][0] == 11
    assert stats.connections_lost == 0


async def test_configure_prepare_threshold_behind_pgbouncer(
    pg: PostgresServer, app_name: str
) -> None:
    from aiopg_resilient.testing import PgBouncer

    async def configure(conn: Any) -> None:
        conn.prepare_threshold = 0  # PgBouncer 1.21+: the user wants them

    async with (
        PgBouncer(pg) as bed,
        ResilientPool(bed.dsn, name=app_name, min_size=1, max_size=1, configure=configure) as pool,
        pool.connection() as conn,
    ):
        seen = (conn.prepare_threshold, getattr(conn, "pooled", None))
    print(f"\n(prepare_threshold, pooled) = {seen}")
    assert seen[0] == 0


async def test_look_lands_on_another_host(
    pg: PostgresServer, pg_standby: Any, app_name: str
) -> None:
    """A read pool over two servers with libpq's load_balance_hosts=random (or a
    round-robin DNS name such as a cloud 'reader endpoint'): the look's NEW connection
    lands on either. On the other server the pid is not there -> 'gone' -> a healthy
    slow read is abandoned and re-run, again and again."""
    dsn = pg.conninfo(
        host="127.0.0.1,127.0.0.1",
        port=f"{pg.port},{pg_standby.port}",
        load_balance_hosts="random",
    )
    async with ResilientPool(
        dsn,
        name=app_name,
        min_size=1,
        max_size=2,
        heartbeat_timeout=0.3,
        retry=RetryPolicy(timeout=5),
    ) as pool:
        results: list[str] = []
        for _ in range(3):
            started = time.monotonic()
            try:
                with anyio.fail_after(10):
                    results.append(f"ok {await pool.fetchval('SELECT 7 FROM pg_sleep(1.5)')}")
            except Exception as exc:
                results.append(f"{type(exc).__name__}: {str(exc)[:160]}")
            results[-1] += f" ({time.monotonic() - started:.1f}s)"
        stats = pool.stats
    print(f"\n{results}\nlost={stats.connections_lost} retries={stats.retries}")
    assert stats.connections_lost == 0


async def test_answer_arriving_during_the_look(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str
) -> None:
    """The INSERT's answer is held, then released at various moments around the look
    (terminate + wait + cancel): every write ends applied exactly once or CommitUnknown
    with what the table says."""
    assert tls_chaos_proxy.dsn is not None
    name = f"race_{app_name}"
    await pg.execute(f"CREATE TABLE {name} (k text PRIMARY KEY)")
    outcomes: dict[str, str] = {}
    try:
        async with pool_for(
            tls_chaos_proxy.dsn, app_name, min_size=2, max_size=4, heartbeat_timeout=PATIENCE
        ) as pool:
            for i, delay in enumerate((0.45, 0.5, 0.51, 0.53, 0.56, 0.6, 0.65, 0.7, 0.8, 1.0)):
                key = f"k{i}"
                tls_chaos_proxy.on_client_message(f"'{key}'".encode(), "freeze_after")

                async def thaw_later(d: float = delay) -> None:
                    await anyio.sleep(d)
                    tls_chaos_proxy.thaw()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(thaw_later)
                    try:
                        with anyio.fail_after(10):
                            await pool.execute(f"INSERT INTO {name} VALUES ('{key}')")
                        outcomes[key] = "ok"
                    except CommitUnknown:
                        outcomes[key] = "unknown"
                    except Exception as exc:
                        outcomes[key] = f"error {type(exc).__name__}: {exc}"
        rows = {k for (k,) in await pg.execute(f"SELECT k FROM {name}")}
    finally:
        tls_chaos_proxy.thaw()
        await pg.execute(f"DROP TABLE IF EXISTS {name}")
    print(f"\n{outcomes}\nrows={sorted(rows)}")
    assert all(o in ("ok", "unknown") for o in outcomes.values()), outcomes
    assert all(k in rows for k, o in outcomes.items() if o == "ok")


async def test_commit_inside_text_on_a_silent_path(
    pg: PostgresServer, tls_chaos_proxy: ChaosProxy, app_name: str, table: str
) -> None:
    assert tls_chaos_proxy.dsn is not None
    async with pool_for(
        tls_chaos_proxy.dsn, app_name, min_size=1, max_size=2, heartbeat_timeout=PATIENCE
    ) as pool:
        tls_chaos_proxy.on_client_message(b"marker_commit_inside", "freeze_after")
        try:
            with anyio.fail_after(10):
                await pool.execute(
                    f"INSERT INTO {table} VALUES ('c', 1); COMMIT; "
                    "SELECT 1 /* marker_commit_inside */"
                )
            outcome = "ok"
        except CommitUnknown:
            outcome = "unknown"
    tls_chaos_proxy.thaw()
    rows = await pg.execute(f"SELECT count(*) FROM {table}")
    print(f"\n{outcome} rows={rows}")
    assert outcome == "unknown" or rows[0][0] == 1
    assert rows[0][0] <= 1


async def test_configure_read_only_and_set_local(pg: PostgresServer, app_name: str) -> None:
    async def configure(conn: Any) -> None:
        await conn.execute("SET default_transaction_read_only = on")

    async with pool_for(pg.dsn, app_name, min_size=2, max_size=2, configure=configure) as ro:
        for _ in range(5):
            assert (
                await ro.fetchval("SELECT current_setting('default_transaction_read_only')") == "on"
            )
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await ro.execute("CREATE TEMP TABLE x (k int)")
        lost_ro = ro.stats.connections_lost
    async with pool_for(pg.dsn, app_name + "b", min_size=1, max_size=1) as pool:
        for _ in range(3):
            async with pool.transaction() as conn:
                await conn.execute("SET LOCAL default_transaction_read_only = on")
            async with pool.transaction() as conn:
                await conn.execute("SET TRANSACTION READ ONLY")
        lost = pool.stats.connections_lost
    print(f"\nlost: configure-ro {lost_ro}, SET LOCAL/SET TRANSACTION {lost}")
    assert lost_ro == 0
    assert lost == 0
