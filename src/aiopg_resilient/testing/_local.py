"""The ``local`` backend: ``initdb`` + ``postgres`` from the server binaries on this machine.

The server runs in the foreground as a child process in its own process group, in a private
temporary directory, as the ``postgres`` OS user when we run as root. Stopping it sends the
signal ``pg_ctl stop -m <mode>`` would, escalating to SIGKILL; a `_Watchdog` process cleans up
if the test process is killed before it can.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from ._backends import (
    _ADMIN_APPLICATION_NAME,
    _DBNAME,
    _ESCALATION_TIMEOUT,
    _MODE_SIGNALS,
    _MODES,
    _SUPERUSER,
    THROWAWAY_SETTINGS,
    StopMode,
    _ControlledBackend,
    _free_port,
)
from ._certs import _Tls
from ._errors import ServerUnavailable
from ._watchdog import _Watchdog

logger = logging.getLogger("aiopg_resilient.testing")

_START_TIMEOUT = 30.0  # seconds for a local server to accept connections


def _postgres_account() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root, else None (run as ourselves)."""
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None or geteuid() != 0:
        return None
    import pwd  # POSIX only

    try:
        entry = pwd.getpwnam(_SUPERUSER)
    except KeyError:
        raise ServerUnavailable(
            "running as root, and PostgreSQL refuses to run as root: create an OS user "
            f"'{_SUPERUSER}' (useradd {_SUPERUSER}) or run the tests as a regular user"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _quote_setting(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _tail(path: Path | None, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    if path is None:
        return "(no server log)"
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(server log {path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


class _LocalBackend(_ControlledBackend):
    """``initdb`` + ``postgres`` in the foreground, in a private temporary directory."""

    name = "local"

    def __init__(
        self, bindir: Path, *, ssl: bool, port: int | None, settings: Mapping[str, str]
    ) -> None:
        self._bindir = bindir
        self._account = _postgres_account()
        self.ssl = ssl
        self._auto_port = port is None
        self.port = port if port is not None else 0
        self._settings = dict(settings)
        self.password = secrets.token_urlsafe(24)
        self._root: Path | None = None
        self._socket_dir: Path | None = None
        self._tls: _Tls | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: _Watchdog | None = None

    # -- setup --

    def _child_kwargs(self) -> dict[str, Any]:
        # No PG* variables and our directory as HOME: libpq in pg_basebackup and in a standby's
        # walreceiver must not use the caller's PGSSLCERT, ~/.postgresql/ (unreadable if root).
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=str(self._root))
        kwargs: dict[str, Any] = {"env": env, "cwd": str(self._root), "stdin": subprocess.DEVNULL}
        if self._account is not None:
            uid, gid = self._account
            kwargs.update(user=uid, group=gid, extra_groups=[])
        return kwargs

    def _chown_tree(self, root: Path) -> None:
        if self._account is None:
            return
        uid, gid = self._account
        os.chown(root, uid, gid)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                os.chown(os.path.join(dirpath, name), uid, gid)

    def _make_root(self, prefix: str) -> Path:
        """Create our private temporary directory, with its watchdog, sockets and server log
        (outside the data directory: it survives `recreate`, pg_basebackup does not copy it)."""
        tmp = "/tmp" if self._account is not None and os.path.isdir("/tmp") else None
        self._root = root = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp))
        try:
            self._watchdog = _Watchdog(root)
        except OSError as exc:  # e.g. no sys.executable when embedded
            logger.warning("no watchdog for the test server (%s); relying on atexit", exc)
        self.data_dir = root / "data"
        self.log_path = root / "postgres.log"
        self._socket_dir = root / "sockets"
        self._socket_dir.mkdir(mode=0o700)
        return root

    def _run(self, args: list[str], what: str) -> None:
        """Run a server program as the server's OS user; RuntimeError with its output on failure."""
        result = subprocess.run(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=False,
            **self._child_kwargs(),
        )
        if result.returncode != 0:
            output = result.stdout.decode("utf-8", "replace")[-4000:]
            raise RuntimeError(f"{what} failed (exit code {result.returncode}):\n{output}")

    def open(self) -> None:
        started = time.monotonic()
        root = self._make_root("aiopg-resilient-pg-")
        if self.ssl:
            self._tls = _Tls(root / "tls")
            self.ca_path = self._tls.ca_path
        self._chown_tree(root)
        self._initdb()
        self._write_config()
        self._spawn_ready()
        logger.info(
            "PostgreSQL started on %s:%d in %.2f s (data dir %s)",
            self.host,
            self.port,
            time.monotonic() - started,
            self.data_dir,
        )

    def _initdb(self) -> None:
        """Run initdb into `data_dir` (which must not exist), with our superuser and password."""
        assert self._root is not None
        pwfile = self._root / "pwfile"
        pwfile.touch(mode=0o600)
        pwfile.write_text(self.password + "\n")
        if self._account is not None:
            os.chown(pwfile, *self._account)
        try:
            self._run(
                [
                    str(self._bindir / "initdb"),
                    f"--pgdata={self.data_dir}",
                    f"--username={_SUPERUSER}",
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                "initdb",
            )
        finally:
            pwfile.unlink()

    def recreate(self) -> None:
        """Stop (immediate), delete the data directory, initdb again, start on the same port."""
        assert self.data_dir is not None
        started = time.monotonic()
        self.stop("immediate", _ESCALATION_TIMEOUT)
        shutil.rmtree(self.data_dir)
        self._initdb()
        self._write_config()
        self._spawn_ready()
        elapsed = time.monotonic() - started
        logger.info("PostgreSQL on port %d: a fresh cluster in %.2f s", self.port, elapsed)

    def _write_config(self) -> None:
        assert self.data_dir is not None
        assert self._socket_dir is not None
        settings: dict[str, str] = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self._socket_dir),
            "ssl": "on" if self._tls else "off",
            **THROWAWAY_SETTINGS,
            "huge_pages": "off",
            "logging_collector": "off",
            "log_destination": "stderr",
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] %q%u@%d %a: ",
        }
        if self._tls is not None:
            settings["ssl_cert_file"] = str(self._tls.cert_path)
            settings["ssl_key_file"] = str(self._tls.key_path)
        settings.update(self._settings)
        lines = [f"{key} = {_quote_setting(value)}" for key, value in settings.items()]
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# added by aiopg_resilient.testing\n" + "\n".join(lines) + "\n")
        hba = [
            "local all all trust",
            "local replication all trust",
            "hostssl all all 127.0.0.1/32 scram-sha-256",
            "host all all 127.0.0.1/32 scram-sha-256",
            "hostssl replication all 127.0.0.1/32 scram-sha-256",
            "host replication all 127.0.0.1/32 scram-sha-256",
        ]
        (self.data_dir / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    # -- process control --

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self._reap()
        started = time.monotonic()
        self._spawn_ready()
        logger.info(
            "PostgreSQL restarted on %s:%d in %.2f s",
            self.host,
            self.port,
            time.monotonic() - started,
        )

    def _spawn_ready(self) -> None:
        """Spawn the postmaster and wait until it accepts connections."""
        attempts = 3 if self._auto_port and self.port == 0 else 1
        for attempt in range(attempts):
            if self._auto_port and self.port == 0:
                self.port = _free_port()
            self._spawn()
            try:
                self._wait_ready()
            except _ExitedEarly as exc:
                if attempt + 1 < attempts and "could not bind" in exc.log_tail:
                    logger.info("port %d was taken meanwhile, trying another one", self.port)
                    self.port = 0
                    continue
                raise RuntimeError(str(exc)) from None
            except BaseException:
                self._kill()
                raise
            return

    def _spawn(self) -> None:
        assert self.data_dir is not None
        assert self.log_path is not None
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self._bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our own process group: killed as one if need be
                **self._child_kwargs(),
            )
        if self._watchdog is not None:
            self._watchdog.watch(self._proc.pid)

    def _wait_ready(self) -> None:
        """Wait until postmaster.pid says "ready", as pg_ctl does."""
        assert self._proc is not None
        assert self.data_dir is not None
        pidfile = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            code = self._proc.poll()
            if code is not None:
                self._forget_proc()
                tail = _tail(self.log_path)
                raise _ExitedEarly(
                    f"PostgreSQL exited with code {code} while starting on port {self.port}; "
                    f"server log {self.log_path} ends with:\n{tail}",
                    tail,
                )
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().splitlines()
                if (
                    len(lines) >= 8
                    and lines[0].strip() == str(self._proc.pid)
                    and lines[7].strip() in ("ready", "standby")
                ):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL did not accept connections within {_START_TIMEOUT:.0f} s on "
                    f"port {self.port}; server log {self.log_path} ends with:\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.01)

    def stop(self, mode: StopMode, timeout: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._reap()
            return
        for step in _MODES[_MODES.index(mode) :]:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(getattr(signal, _MODE_SIGNALS[step]))
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "PostgreSQL on port %d did not stop within %.0f s in %s mode; escalating",
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
        """SIGKILL the postmaster and its whole process group, and reap it."""
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
        """The postmaster has exited and been reaped: nothing for the watchdog to kill."""
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
                if self._root.exists():
                    logger.warning("could not remove %s", self._root)
                self._root = None
            if self._watchdog is not None:
                self._watchdog.close()
                self._watchdog = None

    # -- connections --

    def admin_conninfo(self) -> str:
        assert self._socket_dir is not None
        return make_conninfo(
            host=str(self._socket_dir),
            port=self.port,
            user=_SUPERUSER,
            dbname=_DBNAME,
            application_name=_ADMIN_APPLICATION_NAME,
            connect_timeout=10,
        )


class _ExitedEarly(Exception):
    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail
