"""The PgBouncer process behind `PgBouncer` (`._pgbouncer`): its files, start, stop and kill.

PgBouncer runs in the foreground as a child process in its own process group, from a private
temporary directory holding its configuration, auth file, pid file, log and Unix socket; as
the ``postgres`` OS user when we are root (PgBouncer refuses to run as root). A `_Watchdog`
kills it and removes the directory if the test process dies without closing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from ._backends import _ESCALATION_TIMEOUT, _MODES, StopMode, _Backend, _free_port, _tcp_dsn
from ._errors import ServerControlUnavailable
from ._local import _postgres_account, _tail
from ._watchdog import _Watchdog

logger = logging.getLogger("aiopg_resilient.testing")

_START_TIMEOUT = 10.0  # seconds for PgBouncer to answer on its admin console
_ADMIN_DB = "pgbouncer"
_STOP_SIGNALS = {"smart": signal.SIGINT, "fast": signal.SIGTERM, "immediate": signal.SIGKILL}
_SETTING_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")
_BINARY_PLACES = ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/local/bin/pgbouncer")


def _find_pgbouncer() -> Path:
    """The ``pgbouncer`` executable: on PATH, else where packages put it."""
    found = shutil.which("pgbouncer")
    if found:
        return Path(found)
    for place in _BINARY_PLACES:
        if os.access(place, os.X_OK):
            return Path(place)
    raise ServerControlUnavailable(
        "PgBouncer is not installed (no `pgbouncer` on PATH nor in /usr/sbin): "
        "apt-get install pgbouncer"
    )


def _check_setting(name: str, value: str) -> None:
    if not _SETTING_NAME.match(name):
        raise ValueError(f"not a PgBouncer setting name: {name!r}")
    if "\n" in value or "\r" in value:
        raise ValueError(f"PgBouncer setting {name} must be on one line: {value!r}")


def _admin_query(conninfo: str, command: str) -> list[tuple[Any, ...]]:
    """Run one console command (simple query protocol, which the console needs)."""
    with psycopg.connect(conninfo, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
        cur = conn.execute(command)
        return cur.fetchall() if cur.description is not None else []


class _BouncerProcess(_Backend):
    """One PgBouncer in front of a server: a `_Backend`, so that atexit closes it too."""

    name = "pgbouncer"
    ssl = False

    def __init__(
        self,
        server: _Backend,
        *,
        pool_mode: str,
        settings: Mapping[str, str],
    ) -> None:
        self._binary = _find_pgbouncer()
        self._account = _postgres_account()
        self.server = server
        self.user = server.user
        self.password = server.password
        self.dbname = server.dbname
        self.settings: dict[str, str] = {"pool_mode": pool_mode}
        for name, value in settings.items():
            _check_setting(name, value)
            self.settings[name] = value
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: _Watchdog | None = None
        self.pid_path: Path | None = None

    # -- files --

    def open(self) -> None:
        started = time.monotonic()
        tmp = "/tmp" if self._account is not None and os.path.isdir("/tmp") else None
        self._root = root = Path(tempfile.mkdtemp(prefix="aiopg-resilient-pgbouncer-", dir=tmp))
        try:
            self._watchdog = _Watchdog(root)
        except OSError as exc:  # e.g. no sys.executable when embedded
            logger.warning("no watchdog for the test PgBouncer (%s); relying on atexit", exc)
        (root / "sockets").mkdir(mode=0o700)
        self.log_path = root / "pgbouncer.log"
        self.pid_path = root / "pgbouncer.pid"
        auth = root / "userlist.txt"
        auth.touch(mode=0o600)
        auth.write_text(f'"{self.user}" "{self.password.replace(chr(34), chr(34) * 2)}"\n')
        self.write_config()
        if self._account is not None:
            uid, gid = self._account
            for path in (root, root / "sockets", auth, root / "pgbouncer.ini"):
                os.chown(path, uid, gid)
        self._spawn_ready(pick_port=True)
        logger.info(
            "PgBouncer started on %s:%d in front of port %d in %.2f s",
            self.host,
            self.port,
            self.server.port,
            time.monotonic() - started,
        )

    def write_config(self) -> None:
        """(Re)write pgbouncer.ini from our settings; `start` reads it."""
        root = self._root
        assert root is not None
        server = self.server
        target = f"host={server.host} port={server.port}"
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": str(root / "sockets"),
            "pidfile": str(self.pid_path),
            "auth_type": "scram-sha-256",
            "auth_file": str(root / "userlist.txt"),
            "admin_users": self.user,
            "stats_users": self.user,
            "server_tls_sslmode": "require" if server.ssl else "disable",
            "default_pool_size": "20",
            "max_client_conn": "200",
            "ignore_startup_parameters": "extra_float_digits,options",
            "server_login_retry": "1",
            "query_wait_timeout": "10",
            "server_connect_timeout": "5",
            "log_connections": "1",
            "log_disconnections": "1",
            **self.settings,
        }
        lines = [
            "; written by aiopg_resilient.testing",
            "[databases]",
            f"{server.dbname} = {target} dbname={server.dbname}",
            f"* = {target}",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        (root / "pgbouncer.ini").write_text("\n".join(lines) + "\n")

    # -- process control --

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self) -> None:
        if self.running:
            return
        self._reap()
        self._spawn_ready(pick_port=False)
        logger.info("PgBouncer started again on %s:%d", self.host, self.port)

    def _spawn_ready(self, *, pick_port: bool) -> None:
        attempts = 3 if pick_port else 1
        for attempt in range(attempts):
            if pick_port:
                self.port = _free_port()
                self.write_config()
            self._spawn()
            try:
                self._wait_ready()
            except _ExitedEarly as exc:
                if attempt + 1 < attempts and "in use" in exc.log_tail:
                    logger.info("port %d was taken meanwhile, trying another one", self.port)
                    continue
                raise RuntimeError(str(exc)) from None
            except BaseException:
                self._kill()
                raise
            return

    def _spawn(self) -> None:
        assert self._root is not None
        assert self.log_path is not None
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=str(self._root))
        kwargs: dict[str, Any] = {"env": env, "cwd": str(self._root), "stdin": subprocess.DEVNULL}
        if self._account is not None:
            uid, gid = self._account
            kwargs.update(user=uid, group=gid, extra_groups=[])
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self._binary), str(self._root / "pgbouncer.ini")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our own process group: killed as one if need be
                **kwargs,
            )
        if self._watchdog is not None:
            self._watchdog.watch(self._proc.pid)

    def _wait_ready(self) -> None:
        """Poll the admin console until it answers ``SHOW VERSION``."""
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        conninfo = self.admin_conninfo(connect_timeout=2)
        while True:
            code = self._proc.poll()
            if code is not None:
                self._forget_proc()
                tail = _tail(self.log_path)
                raise _ExitedEarly(
                    f"PgBouncer exited with code {code} while starting on port {self.port}; "
                    f"its log {self.log_path} ends with:\n{tail}",
                    tail,
                )
            try:
                _admin_query(conninfo, "SHOW VERSION")
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PgBouncer did not answer on port {self.port} within "
                        f"{_START_TIMEOUT:.0f} s ({exc}); its log {self.log_path} ends with:\n"
                        f"{_tail(self.log_path)}"
                    ) from None
                time.sleep(0.02)
            else:
                return

    def stop(self, mode: StopMode, timeout: float) -> None:
        """SIGINT (smart), SIGTERM (fast) or SIGKILL (immediate); escalate after `timeout`."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._reap()
            return
        for step in _MODES[_MODES.index(mode) :]:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(_STOP_SIGNALS[step])
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "PgBouncer on port %d did not stop within %.0f s in %s mode; escalating",
                    self.port,
                    timeout,
                    step,
                )
                timeout = _ESCALATION_TIMEOUT
                continue
            self._forget_proc()
            return
        self._kill()

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()
        self._forget_proc()

    def _forget_proc(self) -> None:
        self._proc = None
        if self._watchdog is not None:
            self._watchdog.watch(0)

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._forget_proc()

    def close(self) -> None:
        try:
            self.stop("fast", _ESCALATION_TIMEOUT)
        finally:
            self._kill()
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None
            if self._watchdog is not None:
                self._watchdog.close()
                self._watchdog = None

    # -- connections --

    @property
    def dsn(self) -> str:
        return _tcp_dsn(self.host, self.port, self.user, self.password, self.dbname, None)

    def admin_conninfo(self, connect_timeout: int = 10) -> str:
        return make_conninfo(self.dsn, dbname=_ADMIN_DB, connect_timeout=connect_timeout)

    def admin(self, command: str) -> list[tuple[Any, ...]]:
        return _admin_query(self.admin_conninfo(), command)


class _ExitedEarly(Exception):
    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail
