"""A streaming-replication hot standby of a local test server, for failover tests.

`StandbyServer` is a `PostgresServer` whose cluster is a ``pg_basebackup -R`` of another
(local) one, running on its own port in its own temporary directory (with its own watchdog),
with the same superuser, password, CA and server certificate: the primary's DSN with the
standby's port connects to it. It streams through a physical replication slot on the primary,
so it can be stopped for as long as a test likes and still catch up.

Synchronous replication is switched on the primary with ``ALTER SYSTEM`` +
``pg_reload_conf()``; closing the standby switches it off again (even when the primary is
stopped by then: the setting is removed from its ``postgresql.auto.conf``) and drops the slot,
so a session-wide primary is left as it was found.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import time

import anyio.to_thread
import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import make_conninfo

from ._admin import _query, _wait_until
from ._backends import _Backend, _local_only
from ._errors import ServerControlUnavailable
from ._local import _LocalBackend, _quote_setting, _tail
from ._server import PostgresServer

__all__ = ["StandbyServer"]

logger = logging.getLogger("aiopg_resilient.testing")

_REPLICATION_TIMEOUT = 30.0  # seconds to start streaming, to become sync, to catch up
_SYNC_NAMES = "synchronous_standby_names"


class _StandbyBackend(_LocalBackend):
    """``pg_basebackup -R`` of a running local server, then ``postgres`` on its own port."""

    def __init__(self, primary: _LocalBackend, *, synchronous: bool) -> None:
        super().__init__(primary._bindir, ssl=primary.ssl, port=None, settings={})
        self.primary = primary
        self.password = primary.password
        # Also the name of its replication slot, hence lowercase letters, digits and "_".
        self.application_name = f"aiopg_standby_{secrets.token_hex(4)}"
        self.synchronous = False
        self._want_synchronous = synchronous

    # -- lifecycle --

    def open(self) -> None:
        started = time.monotonic()
        if not self.primary.running:
            raise RuntimeError("the primary is not running: start it before start_standby()")
        root = self._make_root("aiopg-resilient-standby-")
        if self.primary._tls is not None:
            self._tls = self.primary._tls.copy_to(root / "tls")
            self.ca_path = self._tls.ca_path
        self._chown_tree(root)
        self._base_backup()
        self._write_standby_config()
        self._spawn_ready()
        try:
            _wait_until(
                self.primary.admin_conninfo(),
                "SELECT EXISTS (SELECT FROM pg_stat_replication"
                " WHERE application_name = %s AND state = 'streaming')",
                [self.application_name],
                timeout=_REPLICATION_TIMEOUT,
                what=f"the standby on port {self.port} to stream",
            )
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}; its log ends with:\n{_tail(self.log_path)}") from None
        if self._want_synchronous:
            self.set_synchronous(True)
        logger.info(
            "PostgreSQL standby of port %d started on %s:%d in %.2f s",
            self.primary.port,
            self.host,
            self.port,
            time.monotonic() - started,
        )

    def _base_backup(self) -> None:
        primary = self.primary
        tls: dict[str, str] = (
            {"sslmode": "verify-full", "sslrootcert": str(self.ca_path)}
            if self.ca_path is not None
            else {"sslmode": "disable"}
        )
        # -R writes these parameters (application_name and password included) into the
        # standby's primary_conninfo, and the slot into primary_slot_name.
        conninfo = make_conninfo(
            host=primary.host,
            port=primary.port,
            user=primary.user,
            password=self.password,
            application_name=self.application_name,
            connect_timeout=10,
            **tls,
        )
        self._run(
            [
                str(self._bindir / "pg_basebackup"),
                "--pgdata",
                str(self.data_dir),
                "--dbname",
                conninfo,
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-sync",
                "--no-password",
                "--create-slot",
                "--slot",
                self.application_name,
            ],
            "pg_basebackup",
        )

    def _write_standby_config(self) -> None:
        """Point the copied configuration at our own sockets and files.

        Written to ``postgresql.auto.conf``, which is read last: it overrides what the copy
        holds, including a ``synchronous_standby_names`` the primary had set with ALTER SYSTEM
        (which would make this server wait for itself once promoted).
        """
        assert self.data_dir is not None
        settings = {"unix_socket_directories": str(self._socket_dir), _SYNC_NAMES: ""}
        if self._tls is not None:
            settings["ssl_cert_file"] = str(self._tls.cert_path)
            settings["ssl_key_file"] = str(self._tls.key_path)
        lines = [f"{key} = {_quote_setting(value)}" for key, value in settings.items()]
        with (self.data_dir / "postgresql.auto.conf").open("a") as conf:
            conf.write("# added by aiopg_resilient.testing for a standby\n")
            conf.write("\n".join(lines) + "\n")

    def recreate(self) -> None:
        raise ServerControlUnavailable(
            "a standby cannot be recreated: close it and start a new one with start_standby()"
        )

    def close(self) -> None:
        """Undo synchronous mode on the primary, stop and delete the standby, drop its slot."""
        try:
            if self.synchronous:
                self.set_synchronous(False)
        finally:
            try:
                super().close()
            finally:
                self._drop_slot()

    # -- replication --

    def set_synchronous(self, on: bool) -> None:
        """Name this standby (or nobody) in the primary's synchronous_standby_names."""
        primary = self.primary
        if on:
            self.synchronous = True  # set first: close() undoes even a half-done switch
            value = sql.Literal(self.application_name)
            _query(
                primary.admin_conninfo(),
                sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(_SYNC_NAMES), value),
            )
            _query(primary.admin_conninfo(), "SELECT pg_reload_conf()")
            if self.running:
                _wait_until(
                    primary.admin_conninfo(),
                    "SELECT EXISTS (SELECT FROM pg_stat_replication"
                    " WHERE application_name = %s AND sync_state = 'sync')",
                    [self.application_name],
                    timeout=_REPLICATION_TIMEOUT,
                    what=f"standby {self.application_name} to become synchronous",
                )
            logger.info("primary on port %d: synchronous replication on", primary.port)
            return
        try:
            _query(primary.admin_conninfo(), f"ALTER SYSTEM RESET {_SYNC_NAMES}")
            _query(primary.admin_conninfo(), "SELECT pg_reload_conf()")
        except psycopg.OperationalError:
            if primary.running:
                raise
            self._forget_setting_on_disk()
        else:
            # Once the primary has reloaded, commits waiting for a standby are released.
            _wait_until(
                primary.admin_conninfo(),
                "SELECT current_setting(%s) NOT IN ('', %s)"
                " OR NOT EXISTS (SELECT FROM pg_stat_activity WHERE wait_event = 'SyncRep')",
                [_SYNC_NAMES, self.application_name],
                timeout=_REPLICATION_TIMEOUT,
                what="commits waiting for a synchronous standby to be released",
            )
        self.synchronous = False
        logger.info("primary on port %d: synchronous replication off", primary.port)

    def _forget_setting_on_disk(self) -> None:
        """What ``ALTER SYSTEM RESET`` does, for a primary that is not running."""
        if self.primary.data_dir is None:
            return
        auto_conf = self.primary.data_dir / "postgresql.auto.conf"
        with contextlib.suppress(FileNotFoundError):
            lines = auto_conf.read_text().splitlines(keepends=True)
            kept = [line for line in lines if not line.lstrip().startswith(_SYNC_NAMES)]
            if kept != lines:
                auto_conf.write_text("".join(kept))

    def _drop_slot(self) -> None:
        """Drop our replication slot on the primary, so that it stops keeping WAL for us."""
        primary = self.primary
        if not primary.running:
            # A slot is a directory in pg_replslot while the server is down.
            if primary.data_dir is not None:
                shutil.rmtree(
                    primary.data_dir / "pg_replslot" / self.application_name, ignore_errors=True
                )
            return
        deadline = time.monotonic() + _REPLICATION_TIMEOUT
        while True:
            try:
                _query(
                    primary.admin_conninfo(),
                    "SELECT pg_drop_replication_slot(slot_name)"
                    " FROM pg_replication_slots WHERE slot_name = %s",
                    [self.application_name],
                )
                return
            except psycopg.errors.ObjectInUse:
                # The walsender of our (stopped) standby has not noticed yet.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def promote(self) -> None:
        """``pg_promote()``, waiting until this server has left recovery."""
        rows = _query(self.admin_conninfo(), "SELECT pg_promote(true, %s)", [60])
        if rows != [(True,)]:
            raise RuntimeError(f"standby on port {self.port} was not promoted within 60 s")
        logger.info("PostgreSQL standby on port %d promoted", self.port)

    def catch_up(self, timeout: float) -> None:
        """Wait until this standby has replayed all the WAL the primary has written so far."""
        rows = _query(self.primary.admin_conninfo(), "SELECT pg_current_wal_lsn()::text")
        _wait_until(
            self.admin_conninfo(),
            "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
            [rows[0][0]],
            timeout=timeout,
            what=f"standby on port {self.port} to replay WAL up to {rows[0][0]}",
        )


class StandbyServer(PostgresServer):
    """A hot standby of a local `PostgresServer`, streaming from it; see `start_standby`.

    Everything a `PostgresServer` does works on it (`dsn`, `conninfo`, `stop`, `start`,
    `execute`, ...); its `dsn` differs from the primary's in the port (and its copy of the CA
    file) only. Closing it also
    switches synchronous replication off on the primary and drops its replication slot there.
    Only one standby at a time should be synchronous: each one names itself alone.

    Args:
        primary: A running `PostgresServer` on the ``local`` backend.
        synchronous: Make the primary wait for this standby at every commit (see
            `set_synchronous`) once it streams.
    """

    def __init__(self, primary: PostgresServer, *, synchronous: bool = False) -> None:
        super().__init__(ssl=primary.ssl, backend="local")
        self._primary = primary
        self._want_synchronous = synchronous

    def _make_backend(self) -> _Backend:
        primary = self._primary._open_backend()
        if not isinstance(primary, _LocalBackend):
            raise _local_only("a standby", primary.name)
        return _StandbyBackend(primary, synchronous=self._want_synchronous)

    def _standby(self) -> _StandbyBackend:
        backend = self._open_backend()
        assert isinstance(backend, _StandbyBackend)
        return backend

    @property
    def primary(self) -> PostgresServer:
        """The server this standby was copied from and streams from."""
        return self._primary

    @property
    def application_name(self) -> str:
        """Its name in the primary's ``pg_stat_replication`` (and its slot's name there)."""
        return self._standby().application_name

    @property
    def synchronous(self) -> bool:
        """Whether the primary's ``synchronous_standby_names`` names this standby."""
        return self._standby().synchronous

    def set_synchronous_sync(self, on: bool) -> None:
        """Switch synchronous replication to this standby on or off, on the primary.

        On: the primary's ``synchronous_standby_names`` names this standby (``ALTER SYSTEM``,
        then a reload); if the standby is running, waits until it is ``sync`` in
        ``pg_stat_replication``. From then on a commit on the primary waits (wait event
        ``SyncRep``) whenever this standby is stopped. Off: the setting is reset and the
        configuration reloaded, and this waits until no commit waits for a standby any more.
        """
        with self._lock:
            self._standby().set_synchronous(on)

    async def set_synchronous(self, on: bool) -> None:
        """Async `set_synchronous_sync`."""
        await anyio.to_thread.run_sync(lambda: self.set_synchronous_sync(on))

    def promote_sync(self) -> None:
        """Promote the standby to a primary (``pg_promote``); returns once it accepts writes.

        It starts a new timeline. The old primary is not touched: if it was waiting for this
        standby synchronously, it keeps waiting until `set_synchronous_sync` (False) or
        `close_sync`.
        """
        with self._lock:
            self._standby().promote()

    async def promote(self) -> None:
        """Async `promote_sync`."""
        await anyio.to_thread.run_sync(self.promote_sync)

    def catch_up_sync(self, timeout: float = _REPLICATION_TIMEOUT) -> None:
        """Wait until the standby has replayed everything the primary has written so far.

        Only while it is a standby: once promoted it replays nothing more.

        Raises:
            TimeoutError: after ``timeout`` seconds.
        """
        self._standby().catch_up(timeout)

    async def catch_up(self, timeout: float = _REPLICATION_TIMEOUT) -> None:
        """Async `catch_up_sync`."""
        await anyio.to_thread.run_sync(lambda: self.catch_up_sync(timeout))


StandbyServer.__module__ = "aiopg_resilient.testing"
