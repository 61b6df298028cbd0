"""Switchover in the test bed: a primary and its standby swap roles, and both stay up.

`switchover_sync` stops the primary (fast: its walsenders send the standby all its WAL, the
shutdown checkpoint included, before they exit), waits until the standby has replayed it,
promotes the standby (a new timeline), then demotes the old primary (`_demote_server`, i.e.
`PostgresServer.demote_sync`): ``standby.signal``, plus ``primary_conninfo`` (the new primary),
``primary_slot_name`` and ``recovery_target_timeline = 'latest'`` in its
``postgresql.auto.conf``, a slot for it on the new primary, a start, and a wait until it
streams. The same call with the roles swapped switches back.

No ``pg_rewind`` is needed then: the old primary's WAL ends with its shutdown checkpoint,
before the point where the new timeline forks off. When it does not (stopped ``immediate``, or
written to after the standby's promotion), demoting runs ``pg_rewind`` first, which needs
`REWIND_SETTINGS` on the servers (not among the default test settings).

Slots follow the roles: demoting removes, on the old primary, the slot the new primary streamed
through (its ``primary_slot_name``) and creates one on the new primary for the old one. A
`StandbyServer` streams as its `StandbyServer.application_name` (its slot's name) whichever
server it follows, a plain `PostgresServer` as ``aiopg_follower_<port>``: after a switch back,
closing the standby leaves the original primary as it was found. ``synchronous_standby_names``
stays in each server's own configuration (a promoted `StandbyServer` has none).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time

import anyio.to_thread
import psycopg.errors
from psycopg.conninfo import make_conninfo

from ._admin import _query, _wait_until
from ._backends import _local_only
from ._local import _LocalBackend, _quote_setting, _tail
from ._replica import StandbyServer
from ._rewind import REWIND_SETTINGS, _controldata, _divergence, _rewind, _timeline
from ._server import PostgresServer

__all__ = [
    "REWIND_SETTINGS",
    "catch_up",
    "catch_up_sync",
    "promote",
    "promote_sync",
    "switchover",
    "switchover_sync",
]

logger = logging.getLogger("aiopg_resilient.testing")

_TIMEOUT = 30.0  # seconds to catch up, to stream from the new primary
_STOP_TIMEOUT = 30.0
# The settings a demotion writes; older values of these are removed from postgresql.auto.conf.
_FOLLOWER_KEYS = ("primary_conninfo", "primary_slot_name", "recovery_target_timeline")


# --- public helpers ---------------------------------------------------------------------------


def switchover_sync(
    primary: PostgresServer, standby: PostgresServer, *, timeout: float = _TIMEOUT
) -> None:
    """Make ``standby`` the primary and ``primary`` a hot standby streaming from it.

    ``primary`` must be a running primary and ``standby`` a running standby streaming from it
    (a `StandbyServer`, or a server demoted earlier: ``switchover_sync(standby, primary)``
    switches back). Clients of ``primary`` lose their sessions (``AdminShutdown``, as in a
    fast stop); sessions on ``standby`` survive its promotion. Returns once ``primary``
    streams from ``standby``.

    Raises:
        TimeoutError: if ``standby`` does not stream from ``primary`` (nothing was changed),
            or has not replayed its shutdown checkpoint within ``timeout`` seconds (then
            ``primary`` is started again as the primary, ``standby`` left a standby).
        RuntimeError: if the servers are not a running primary and a running standby.
        ServerControlUnavailable: on any backend but ``local``.
    """
    old = _local(primary, "a switchover")
    new = _local(standby, "a switchover")
    with primary._lock, standby._lock:
        started = time.monotonic()
        _check_roles(old, new)
        _wait_until(
            old.admin_conninfo(),
            "SELECT EXISTS (SELECT FROM pg_stat_replication"
            " WHERE application_name = %s AND state = 'streaming')",
            [_follower_name(standby)],
            timeout=timeout,
            what=f"the standby on port {new.port} to stream from port {old.port}",
        )
        old.stop("fast", _STOP_TIMEOUT)
        checkpoint = _controldata(old)["Latest checkpoint location"]
        try:
            _wait_until(
                new.admin_conninfo(),
                "SELECT pg_last_wal_replay_lsn() > %s::pg_lsn",
                [checkpoint],
                timeout=timeout,
                what=f"the standby on port {new.port} to replay the old primary's "
                f"shutdown checkpoint at {checkpoint}",
            )
        except TimeoutError:
            old.start()
            raise
        promoted = time.monotonic()
        _promote(new.admin_conninfo(), new.port)
        _demote(old, new, _follower_name(primary), timeout)
        logger.info(
            "switchover: port %d is the primary, port %d follows it; %.2f s "
            "(%.2f s to stop and catch up)",
            new.port,
            old.port,
            time.monotonic() - started,
            promoted - started,
        )


async def switchover(
    primary: PostgresServer, standby: PostgresServer, *, timeout: float = _TIMEOUT
) -> None:
    """Async `switchover_sync` (cancelling it waits until the switchover has finished)."""
    await anyio.to_thread.run_sync(lambda: switchover_sync(primary, standby, timeout=timeout))


def promote_sync(server: PostgresServer) -> None:
    """``pg_promote()`` any standby (a `StandbyServer` or a demoted server); returns once it
    accepts writes. Unlike `switchover_sync`, leaves its old primary alone (a failover)."""
    with server._lock:
        _promote(server._open_backend().admin_conninfo(), server.port)


async def promote(server: PostgresServer) -> None:
    """Async `promote_sync`."""
    await anyio.to_thread.run_sync(lambda: promote_sync(server))


def catch_up_sync(
    standby: PostgresServer, primary: PostgresServer, *, timeout: float = _TIMEOUT
) -> None:
    """Wait until ``standby`` has replayed all the WAL ``primary`` has written so far.

    `StandbyServer.catch_up_sync` for any pair, e.g. a demoted server and its new primary.

    Raises:
        TimeoutError: after ``timeout`` seconds.
    """
    rows = _query(primary._open_backend().admin_conninfo(), "SELECT pg_current_wal_lsn()::text")
    _wait_until(
        standby._open_backend().admin_conninfo(),
        "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
        [rows[0][0]],
        timeout=timeout,
        what=f"the standby on port {standby.port} to replay WAL up to {rows[0][0]}",
    )


async def catch_up(
    standby: PostgresServer, primary: PostgresServer, *, timeout: float = _TIMEOUT
) -> None:
    """Async `catch_up_sync`."""
    await anyio.to_thread.run_sync(lambda: catch_up_sync(standby, primary, timeout=timeout))


def _demote_server(
    server: PostgresServer, new_primary: PostgresServer, *, timeout: float = _TIMEOUT
) -> None:
    """`PostgresServer.demote_sync`."""
    old = _local(server, "demoting a server")
    new = _local(new_primary, "demoting a server")
    if old is new:
        raise ValueError("a server cannot follow itself")
    with server._lock, new_primary._lock:
        if not new.running:
            raise RuntimeError(f"the new primary on port {new.port} is not running")
        _demote(old, new, _follower_name(server), timeout)


# --- steps ------------------------------------------------------------------------------------


def _local(server: PostgresServer, what: str) -> _LocalBackend:
    backend = server._open_backend()
    if not isinstance(backend, _LocalBackend):
        raise _local_only(what, backend.name)
    return backend


def _follower_name(server: PostgresServer) -> str:
    """The application_name (and slot name) ``server`` streams as, whichever server it follows."""
    if isinstance(server, StandbyServer):
        return server.application_name
    return f"aiopg_follower_{server.port}"


def _in_recovery(backend: _LocalBackend) -> bool:
    return bool(_query(backend.admin_conninfo(), "SELECT pg_is_in_recovery()")[0][0])


def _check_roles(old: _LocalBackend, new: _LocalBackend) -> None:
    if old is new:
        raise ValueError("a server cannot switch over to itself")
    if not old.running or _in_recovery(old):
        raise RuntimeError(f"the server on port {old.port} is not a running primary")
    if not new.running or not _in_recovery(new):
        raise RuntimeError(f"the server on port {new.port} is not a running standby")


def _promote(conninfo: str, port: int) -> None:
    if _query(conninfo, "SELECT pg_promote(true, %s)", [60]) != [(True,)]:
        raise RuntimeError(f"the standby on port {port} was not promoted within 60 s")
    logger.info("PostgreSQL standby on port %s promoted", port)


def _write_follower_config(old: _LocalBackend, new: _LocalBackend, name: str) -> None:
    """``standby.signal`` and the recovery settings (in ``postgresql.auto.conf``, read last)."""
    assert old.data_dir is not None
    if new.ca_path is None:
        tls = {"sslmode": "disable"}
    elif old.ca_path is None:
        tls = {"sslmode": "require"}
    else:  # the same CA signed both certificates: the standby is a copy of the primary
        tls = {"sslmode": "verify-full", "sslrootcert": str(old.ca_path)}
    conninfo = make_conninfo(
        host=new.host,
        port=new.port,
        user=new.user,
        password=new.password,
        application_name=name,
        connect_timeout=10,
        **tls,
    )
    settings = {
        "primary_conninfo": conninfo,
        "primary_slot_name": name,
        "recovery_target_timeline": "latest",
    }
    auto_conf = old.data_dir / "postgresql.auto.conf"
    kept = [
        line
        for line in auto_conf.read_text().splitlines(keepends=True)
        if line.partition("=")[0].strip() not in _FOLLOWER_KEYS
    ]
    lines = [f"{key} = {_quote_setting(value)}\n" for key, value in settings.items()]
    auto_conf.write_text("".join([*kept, "# added by aiopg_resilient.testing: demoted\n", *lines]))
    with contextlib.suppress(FileNotFoundError):
        (old.data_dir / "recovery.signal").unlink()
    (old.data_dir / "standby.signal").touch()
    if old._account is not None:
        os.chown(old.data_dir / "standby.signal", *old._account)


def _demote(old: _LocalBackend, new: _LocalBackend, name: str, timeout: float) -> None:
    """Stop ``old`` (fast), make it a standby of ``new``, start it, wait until it streams."""
    started = time.monotonic()
    if _in_recovery(new):
        raise RuntimeError(f"the new primary on port {new.port} is in recovery")
    old.stop("fast", _STOP_TIMEOUT)
    assert old.data_dir is not None
    control = _controldata(old)
    system = _query(new.admin_conninfo(), "SELECT system_identifier::text FROM pg_control_system()")
    if control["Database system identifier"] != system[0][0]:
        raise RuntimeError(
            f"the server on port {old.port} cannot follow port {new.port}: another cluster"
        )
    why = _divergence(control, new)
    if why is not None:
        _rewind(old, new, control, why)
    # The slot the new primary streamed through from the old one is of no use any more: it
    # would keep WAL on the old primary forever. A slot is a directory while it is down.
    former = _query(new.admin_conninfo(), "SELECT current_setting('primary_slot_name')")[0][0]
    if former:
        shutil.rmtree(old.data_dir / "pg_replslot" / str(former), ignore_errors=True)
    _write_follower_config(old, new, name)
    with contextlib.suppress(psycopg.errors.DuplicateObject):
        _query(new.admin_conninfo(), "SELECT pg_create_physical_replication_slot(%s, true)", [name])
    old.start()
    try:
        _wait_until(
            old.admin_conninfo(),
            "SELECT pg_is_in_recovery() AND EXISTS (SELECT FROM pg_stat_wal_receiver"
            " WHERE status = 'streaming' AND received_tli = %s)",
            [_timeline(new)],
            timeout=timeout,
            what=f"the server on port {old.port} to stream from port {new.port}",
        )
        _wait_until(
            new.admin_conninfo(),
            "SELECT EXISTS (SELECT FROM pg_stat_replication"
            " WHERE application_name = %s AND state = 'streaming')",
            [name],
            timeout=timeout,
            what=f"port {new.port} to stream to port {old.port}",
        )
    except TimeoutError as exc:
        raise RuntimeError(f"{exc}; its log ends with:\n{_tail(old.log_path)}") from None
    logger.info(
        "PostgreSQL on port %d demoted to a standby of port %d in %.2f s%s",
        old.port,
        new.port,
        time.monotonic() - started,
        " (pg_rewind)" if why is not None else "",
    )
