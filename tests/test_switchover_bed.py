"""Switchover in the test bed (aiopg_resilient.testing._switchover), against real PostgreSQL.

The primaries here are private to this module: a switchover demotes its primary, which must
never be the session-wide `pg`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import anyio
import psycopg
import psycopg.errors
import pytest

from aiopg_resilient.testing import PostgresServer
from aiopg_resilient.testing._backends import ENV_DSN
from aiopg_resilient.testing._switchover import REWIND_SETTINGS, catch_up, promote, switchover

pytestmark = [
    pytest.mark.skipif(bool(os.environ.get(ENV_DSN)), reason=f"{ENV_DSN}: no server control"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def primary() -> Iterator[PostgresServer]:
    """A private primary with the default test settings (no wal_log_hints: no pg_rewind)."""
    with PostgresServer() as server:
        yield server


async def _rows(server: PostgresServer, table: str) -> list[int]:
    return [k for (k,) in await server.execute(f"SELECT k FROM {table} ORDER BY k")]


async def _is_standby(server: PostgresServer) -> bool:
    return bool((await server.execute("SELECT pg_is_in_recovery()"))[0][0])


async def _slots(server: PostgresServer) -> list[tuple[object, ...]]:
    return await server.execute("SELECT slot_name, active FROM pg_replication_slots")


async def test_switchover_and_back(primary: PostgresServer) -> None:
    """The standby takes writes, the old primary follows it (and gets the new rows); then the
    same with the roles swapped; closing the standby leaves the primary as it was."""
    with anyio.fail_after(20):
        standby = await primary.start_standby()  # typed StandbyServer, for catch_up()
        async with standby:
            await primary.execute("CREATE TABLE sw (k int)")
            await primary.execute("INSERT INTO sw VALUES (1)")
            async with (
                await psycopg.AsyncConnection.connect(primary.dsn, autocommit=True) as held,
                await psycopg.AsyncConnection.connect(standby.dsn, autocommit=True) as kept,
            ):
                assert kept.info.parameter_status("in_hot_standby") == "on"
                await switchover(primary, standby)
                # Sessions on the old primary were ended by its fast shutdown.
                with pytest.raises(psycopg.errors.AdminShutdown) as info:
                    await held.execute("SELECT 1")
                assert info.value.sqlstate == "57P01"
                assert "terminating connection due to administrator command" in str(info.value)
                # Sessions on the promoted standby survive; in_hot_standby is reported again
                # (ParameterStatus) with the reply to their next query, not before.
                assert kept.info.parameter_status("in_hot_standby") == "on"
                await kept.execute("INSERT INTO sw VALUES (2)")
                assert kept.info.parameter_status("in_hot_standby") == "off"
            assert await _is_standby(primary)
            assert not await _is_standby(standby)
            await catch_up(primary, standby)
            assert await _rows(primary, "sw") == [1, 2]
            name = f"aiopg_follower_{primary.port}"
            assert await standby.execute(
                "SELECT application_name, state FROM pg_stat_replication"
            ) == [(name, "streaming")]
            assert await _slots(standby) == [(name, True)]
            assert await _slots(primary) == []  # the standby's old slot: removed
            async with await psycopg.AsyncConnection.connect(primary.dsn) as ro:
                assert ro.info.parameter_status("in_hot_standby") == "on"
                assert ro.info.parameter_status("default_transaction_read_only") == "off"
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    await ro.execute("INSERT INTO sw VALUES (3)")

            await switchover(standby, primary)  # and back
            assert not await _is_standby(primary)
            assert await _is_standby(standby)
            await primary.execute("INSERT INTO sw VALUES (3)")
            await standby.catch_up()  # its own helper works again: it follows its primary
            assert await _rows(standby, "sw") == [1, 2, 3]
            assert await _slots(primary) == [(standby.application_name, True)]
            assert await _slots(standby) == []
        assert await _slots(primary) == []
        assert not await _is_standby(primary)
        await primary.execute("DROP TABLE sw")


async def test_switchover_checks_roles_first(primary: PostgresServer) -> None:
    """Switching over from a standby, or to a stopped one, fails before touching anything."""
    with anyio.fail_after(15):
        async with await primary.start_standby() as standby:
            with pytest.raises(RuntimeError, match="not a running primary"):
                await switchover(standby, primary)
            await standby.stop()
            with pytest.raises(RuntimeError, match="not a running standby"):
                await switchover(primary, standby)
            assert primary.running
            assert not await _is_standby(primary)


async def test_diverged_primary_cannot_follow_without_rewind_settings(
    primary: PostgresServer,
) -> None:
    """After a failover, an old primary that wrote on cannot follow the promoted standby
    without pg_rewind, which the default test settings do not allow: it is left stopped,
    unchanged, and starts again as a primary."""
    with anyio.fail_after(15):
        async with await primary.start_standby() as standby:
            await promote(standby)
            await primary.execute("CREATE TABLE diverged (k int)")
            with pytest.raises(RuntimeError, match="REWIND_SETTINGS"):
                await primary.demote(standby)
            assert not primary.running
            await primary.start()
            assert not await _is_standby(primary)
            await primary.execute("DROP TABLE diverged")


@pytest.mark.parametrize("how", ["wrote_on", "crashed"])
async def test_diverged_primary_follows_after_rewind(how: str) -> None:
    """With REWIND_SETTINGS, an old primary whose WAL went past the fork point (it wrote after
    the failover, or crashed with WAL the standby never got) is rewound: it loses those rows,
    follows the new primary, and a switch back works."""
    with anyio.fail_after(25):
        async with PostgresServer(settings=REWIND_SETTINGS) as old:
            new = await old.start_standby()
            async with new:
                await old.execute("CREATE TABLE rw (k int)")
                await new.catch_up()
                if how == "crashed":
                    await new.stop("immediate")
                    await old.execute("INSERT INTO rw VALUES (-1)")  # the standby never gets it
                    await old.stop("immediate")
                    await new.start()
                    await promote(new)
                else:
                    await promote(new)
                    await old.execute("INSERT INTO rw VALUES (-1)")
                await new.execute("INSERT INTO rw VALUES (1)")
                await old.demote(new)
                assert await _is_standby(old)
                await catch_up(old, new)
                assert await _rows(old, "rw") == [1]
                await switchover(new, old)
                await old.execute("INSERT INTO rw VALUES (2)")
                await new.catch_up()
                assert await _rows(new, "rw") == [1, 2]
