"""PostgresServer.recreate() and standbys (StandbyServer), against real PostgreSQL.

The session server (`pg`) is shared by the whole suite: every test that makes it wait for a
synchronous standby closes that standby before it ends (``async with``), which resets the
primary, and then checks that no commit is left waiting.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio
import psycopg
import psycopg.errors
import pytest
from psycopg.conninfo import conninfo_to_dict

from aiopg_resilient.testing import PostgresServer, ServerControlUnavailable, StandbyServer
from aiopg_resilient.testing._backends import ENV_DSN
from aiopg_resilient.testing._docker import _DockerBackend
from aiopg_resilient.testing._replica import _StandbyBackend
from aiopg_resilient.testing._watchdog import _OPEN_BACKENDS

needs_control = pytest.mark.skipif(
    bool(os.environ.get(ENV_DSN)), reason=f"{ENV_DSN} names a server we cannot control"
)
pytestmark = needs_control

_TIMELINE = "SELECT substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8)"


async def _value(server: PostgresServer, sql: str, *params: object) -> object:
    rows = await server.execute(sql, params or None)
    return rows[0][0]


async def _wait_for_value(
    server: PostgresServer, sql: str, expected: object, *params: object, timeout: float = 10
) -> None:
    with anyio.fail_after(timeout):
        while await _value(server, sql, *params) != expected:
            await anyio.sleep(0.01)


async def _sync_waiters(pg: PostgresServer) -> int:
    rows = await pg.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
    return int(rows[0][0])


async def _assert_primary_clean(pg: PostgresServer) -> None:
    """The session server is as a test found it: no sync mode, no waiter, no slot, no sender."""
    assert await _value(pg, "SHOW synchronous_standby_names") == ""
    assert await _sync_waiters(pg) == 0
    assert await pg.execute("SELECT slot_name FROM pg_replication_slots") == []
    await _wait_for_value(pg, "SELECT count(*) FROM pg_stat_replication", 0)


@pytest.fixture
async def fresh_pg() -> AsyncIterator[PostgresServer]:
    """A private server, for tests that would wipe or break the session one."""
    async with PostgresServer() as server:
        yield server


# --- recreate ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_recreate_puts_a_new_cluster_behind_the_same_dsn(fresh_pg: PostgresServer) -> None:
    """recreate(): same dsn and port, another system_identifier, timeline 1, tables gone."""
    pg = fresh_pg
    dsn, port = pg.dsn, pg.port
    await pg.execute("CREATE TABLE before_recreate (x int)")
    system_id = await _value(pg, "SELECT system_identifier FROM pg_control_system()")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as held:
        await pg.recreate()
        with pytest.raises(psycopg.OperationalError):
            await held.execute("SELECT 1")
    assert pg.running
    assert (pg.dsn, pg.port) == (dsn, port)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT system_identifier, to_regclass('before_recreate'),"
            " (SELECT timeline_id FROM pg_control_checkpoint()),"
            " (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())"
            " FROM pg_control_system()"
        )
        row = await cur.fetchone()
    assert row is not None
    new_id, table, timeline, ssl = row
    assert new_id != system_id
    assert table is None
    assert timeline == 1
    assert ssl is True


def test_recreate_and_standbys_need_the_local_backend(
    pg: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """recreate() and start_standby() raise ServerControlUnavailable on env and docker."""
    monkeypatch.setenv(ENV_DSN, pg.dsn)
    with PostgresServer() as server:
        assert server.backend == "env"
        with pytest.raises(ServerControlUnavailable, match="local backend"):
            server.recreate_sync()
        with pytest.raises(ServerControlUnavailable, match="local backend"):
            server.start_standby_sync()
    docker = _DockerBackend(ssl=True, port=None, settings={})  # never opened: no container
    with pytest.raises(ServerControlUnavailable, match="docker backend"):
        docker.recreate()
    server = PostgresServer(backend="docker")
    server._backend = docker  # as if opened, to reach start_standby's check
    try:
        with pytest.raises(ServerControlUnavailable, match="docker backend"):
            server.start_standby_sync()
    finally:
        server.close_sync()
    assert pg.running


# --- standby ----------------------------------------------------------------------------------


async def test_standby_replays_what_the_primary_writes(
    pg: PostgresServer, pg_standby: StandbyServer, table: str
) -> None:
    """A row inserted on the primary shows up on the standby, which is in recovery, read-only."""
    params, standby_params = conninfo_to_dict(pg.dsn), conninfo_to_dict(pg_standby.dsn)
    assert standby_params.pop("port") != params.pop("port")
    ca, standby_ca = params.pop("sslrootcert"), standby_params.pop("sslrootcert")
    assert await anyio.Path(ca).read_bytes() == await anyio.Path(standby_ca).read_bytes()
    assert standby_params == params  # same host, user, password, sslmode, and CA (a copy)
    assert pg_standby.conninfo(application_name="x") != pg.conninfo(application_name="x")
    await pg.execute(f"INSERT INTO {table} VALUES ('k', 1)")
    await pg_standby.catch_up()
    async with await psycopg.AsyncConnection.connect(pg_standby.dsn, autocommit=True) as conn:
        cur = await conn.execute(
            f"SELECT v, pg_is_in_recovery(),"
            f" (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()) FROM {table}"
        )
        assert await cur.fetchall() == [(1, True, True)]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await conn.execute(f"INSERT INTO {table} VALUES ('k', 2)")
    assert not pg_standby.synchronous
    assert await pg.execute(
        "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s",
        [pg_standby.application_name],
    ) == [("streaming", "async")]


@pytest.mark.slow
async def test_stopped_standby_catches_up_and_close_cleans_everything(
    pg: PostgresServer, table: str
) -> None:
    """A standby stopped (immediate) while the primary writes catches up once started again;
    closing it stops its server, deletes its files and drops its slot on the primary."""
    async with await pg.start_standby() as standby:
        await standby.stop("immediate")
        await pg.execute(f"INSERT INTO {table} SELECT 'k', g FROM generate_series(1, 1000) g")
        await pg.execute("SELECT pg_switch_wal()")
        await pg.execute("CHECKPOINT")  # the slot keeps the WAL the standby still needs
        await standby.start()
        await standby.catch_up()
        assert await standby.execute(f"SELECT count(*) FROM {table}") == [(1000,)]
        assert standby.data_dir is not None
        data_dir = anyio.Path(standby.data_dir)
        pid = int((await (data_dir / "postmaster.pid").read_text()).split()[0])
    assert not await data_dir.parent.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not standby.running
    await _assert_primary_clean(pg)


@pytest.mark.slow
@pytest.mark.parametrize("release", ["reset", "start_standby"])
async def test_synchronous_commit_waits_for_the_standby(
    pg: PostgresServer, table: str, app_name: str, release: str
) -> None:
    """With a synchronous standby stopped, a commit on the primary waits (SyncRep); resetting
    sync mode or starting the standby releases it, and closing the standby resets the primary."""
    async with await pg.start_standby(synchronous=True) as standby:
        assert standby.synchronous
        assert await _value(pg, "SHOW synchronous_standby_names") == standby.application_name
        assert await pg.execute(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
            [standby.application_name],
        ) == [("sync",)]
        await standby.stop("fast")
        done = anyio.Event()
        async with (
            await psycopg.AsyncConnection.connect(
                pg.conninfo(application_name=app_name), autocommit=True
            ) as conn,
            anyio.create_task_group() as tg,
        ):

            async def insert() -> None:
                await conn.execute(f"INSERT INTO {table} VALUES ('k', 1)")
                done.set()

            tg.start_soon(insert)
            await _wait_for_value(
                pg,
                "SELECT wait_event FROM pg_stat_activity WHERE application_name = %s",
                "SyncRep",
                app_name,
            )
            await anyio.sleep(0.2)
            assert not done.is_set()
            if release == "reset":
                await standby.set_synchronous(False)
                assert not standby.synchronous
            else:
                await standby.start()
            with anyio.fail_after(10):
                await done.wait()
        assert await _value(pg, f"SELECT count(*) FROM {table}") == 1
        assert await _sync_waiters(pg) == 0
    await _assert_primary_clean(pg)


@pytest.mark.slow
async def test_closing_a_synchronous_standby_resets_a_stopped_primary(
    fresh_pg: PostgresServer,
) -> None:
    """Closed while the primary is down, a synchronous standby still leaves it without sync
    mode and without its slot once started again."""
    pg = fresh_pg
    standby = await pg.start_standby(synchronous=True)
    try:
        await pg.stop("fast")
    finally:
        await standby.close()
    await pg.start()
    await pg.execute("CREATE TABLE after_close (x int)")  # would wait forever in sync mode
    await _assert_primary_clean(pg)


@pytest.mark.slow
async def test_promoted_standby_takes_writes_on_a_new_timeline(pg: PostgresServer) -> None:
    """promote(): the standby leaves recovery, accepts writes, and is on another timeline."""
    async with await pg.start_standby() as standby:
        await standby.promote()
        assert await _value(standby, "SELECT pg_is_in_recovery()") is False
        await standby.execute("CREATE TABLE promoted (x int)")
        await standby.execute("INSERT INTO promoted VALUES (1)")
        assert await standby.execute("SELECT x FROM promoted") == [(1,)]
        assert await _value(pg, "SELECT to_regclass('promoted')") is None
        assert await _value(standby, _TIMELINE) != await _value(pg, _TIMELINE)
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            await standby.promote()  # not a standby any more
    await _assert_primary_clean(pg)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.5])
async def test_cancelled_start_standby_leaves_nothing_open(
    pg: PostgresServer, delay: float
) -> None:
    """Cancelled while it starts a synchronous standby, `async with await start_standby()`
    still closes it: no standby left open, the primary without sync mode or slot."""
    with anyio.move_on_after(delay) as scope:
        async with await pg.start_standby(synchronous=True):
            await anyio.sleep(30)
    assert scope.cancelled_caught
    assert not any(isinstance(backend, _StandbyBackend) for backend in _OPEN_BACKENDS)
    await _assert_primary_clean(pg)


@pytest.mark.slow
async def test_standby_without_tls_follows_its_primary() -> None:
    """A standby of a server with ssl=False has no TLS either, and its dsn says so."""
    async with (
        PostgresServer(ssl=False) as primary,
        await primary.start_standby() as standby,
    ):
        assert standby.ca_path is None
        assert conninfo_to_dict(standby.dsn)["sslmode"] == "disable"
        assert await standby.execute("SHOW ssl") == [("off",)]
        assert await standby.execute("SELECT pg_is_in_recovery()") == [(True,)]
