"""A throwaway PostgreSQL server with TLS, for tests (ours and our users').

`PostgresServer` runs a real server that tests can break on purpose: stop it, restart it,
terminate its backends. Three backends can provide it:

* ``local``: ``initdb`` + ``postgres`` from the server binaries installed on this machine, run
  in the foreground as a child process in a private temporary directory (as the ``postgres``
  OS user when running as root). Server binaries are looked up in the directory named by
  ``AIOPG_RESILIENT_PG_BINDIR`` if that variable is set (and nowhere else), otherwise next to
  ``postgres`` on ``PATH``, in ``pg_config --bindir``, then in the usual package locations
  (``/usr/lib/postgresql/<N>/bin``, ``/usr/pgsql-<N>/bin``, Homebrew), newest version first.
* ``env``: an existing server named by the ``AIOPG_RESILIENT_TEST_DSN`` environment variable.
  Queries work; controlling the server (start, stop, restart) does not.
* ``docker``: ``postgres:15`` in a container through testcontainers, when Docker works.

``backend="auto"`` picks ``env`` when ``AIOPG_RESILIENT_TEST_DSN`` is set, else ``local`` when
server binaries are found, else ``docker`` when usable, else raises `ServerUnavailable`.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl as ssl_module
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

if TYPE_CHECKING:
    from psycopg.sql import SQL, Composed

__all__ = ["PostgresServer", "ServerControlUnavailable", "ServerUnavailable"]

logger = logging.getLogger("aiopg_resilient.testing")

ENV_DSN = "AIOPG_RESILIENT_TEST_DSN"
"""Environment variable naming an existing server for the ``env`` backend."""

ENV_BINDIR = "AIOPG_RESILIENT_PG_BINDIR"
"""Environment variable naming the only directory searched for ``postgres`` and ``initdb``."""

StopMode = Literal["smart", "fast", "immediate"]
BackendName = Literal["auto", "local", "env", "docker"]

_INSTALL_HINT = (
    "install PostgreSQL server binaries (apt-get install postgresql), "
    f"or set {ENV_DSN}, "
    "or install Docker and `pip install aiopg-resilient[docker]`"
)
_START_TIMEOUT = 30.0  # seconds for a local server to accept connections
_DOCKER_START_TIMEOUT = 120.0  # a first run may pull the image
_STOP_TIMEOUT = 30.0
_ESCALATION_TIMEOUT = 10.0  # per step when a stop does not finish in time
_ADMIN_APPLICATION_NAME = "aiopg_resilient.testing"
_SUPERUSER = "postgres"
_DBNAME = "postgres"
_DOCKER_IMAGE = "postgres:15"
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_MODES: tuple[StopMode, ...] = ("smart", "fast", "immediate")
_MODE_SIGNALS = {"smart": "SIGTERM", "fast": "SIGINT", "immediate": "SIGQUIT"}


class ServerUnavailable(RuntimeError):
    """No way to run a PostgreSQL server for tests was found on this machine.

    The message says what to install: PostgreSQL server binaries, an existing server named by
    ``AIOPG_RESILIENT_TEST_DSN``, or Docker with ``aiopg-resilient[docker]``.
    """


class ServerControlUnavailable(RuntimeError):
    """The server cannot be started, stopped or restarted by this `PostgresServer`.

    Raised by the fault methods and `PostgresServer.proxy_ssl_contexts` on the ``env`` backend
    (an existing server named by ``AIOPG_RESILIENT_TEST_DSN``), which this library does not own.
    """


ServerUnavailable.__module__ = "aiopg_resilient.testing"
ServerControlUnavailable.__module__ = "aiopg_resilient.testing"


# --- helpers ----------------------------------------------------------------------------------


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _version_key(bindir: Path) -> tuple[int, ...]:
    """Sort key: the version in ``.../postgresql/15/bin`` or ``.../pgsql-9.6/bin``."""
    match = re.search(r"(\d+(?:\.\d+)*)$", bindir.parent.name)
    return tuple(int(part) for part in match.group(1).split(".")) if match else (-1,)


def _has_server_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in ("postgres", "initdb"))


def _find_bindir() -> Path | None:
    """Find a directory holding the ``postgres`` and ``initdb`` executables, or None.

    ``AIOPG_RESILIENT_PG_BINDIR``, when set, is the only place searched.
    """
    override = os.environ.get(ENV_BINDIR)
    if override:
        path = Path(override)
        return path if _has_server_binaries(path) else None
    candidates: list[Path] = []
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    for pattern in (
        "/usr/lib/postgresql/*/bin",
        "/usr/pgsql-*/bin",
        "/opt/homebrew/opt/postgresql@*/bin",
        "/usr/local/opt/postgresql@*/bin",
    ):
        found = [Path(p) for p in glob.glob(pattern)]
        candidates.extend(sorted(found, key=_version_key, reverse=True))
    return next((c for c in candidates if _has_server_binaries(c)), None)


def _docker_usable() -> bool:
    """True when testcontainers is importable and ``docker info`` reaches an engine."""
    if importlib.util.find_spec("testcontainers") is None:
        return False
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        result = subprocess.run([docker, "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


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


def _tcp_dsn(
    host: str, port: int, user: str, password: str, dbname: str, ca_path: Path | None
) -> str:
    if ca_path is None:
        return make_conninfo(
            host=host, port=port, user=user, password=password, dbname=dbname, sslmode="disable"
        )
    return make_conninfo(
        host=host,
        port=port,
        user=user,
        password=password,
        dbname=dbname,
        sslmode="verify-full",
        sslrootcert=str(ca_path),
    )


def _no_control(what: str) -> ServerControlUnavailable:
    return ServerControlUnavailable(
        f"{what} needs the local or docker backend; this PostgresServer uses an existing "
        f"server named by {ENV_DSN}, which it cannot control"
    )


class _Tls:
    """A CA and a server certificate for localhost, 127.0.0.1 and ::1, written as files."""

    def __init__(self, directory: Path) -> None:
        try:
            import trustme  # optional dependency, needed only here
        except ImportError as exc:
            raise ServerUnavailable(
                "PostgresServer(ssl=True) needs trustme: pip install 'aiopg-resilient[testing]'"
            ) from exc
        self._ca = trustme.CA(organization_name="aiopg_resilient test CA")
        self._cert = self._ca.issue_cert("localhost", "127.0.0.1", "::1")
        directory.mkdir(mode=0o700, exist_ok=True)
        self.ca_path = directory / "ca.pem"
        self.cert_path = directory / "server.crt"
        self.key_path = directory / "server.key"
        self._ca.cert_pem.write_to_path(str(self.ca_path))
        self.cert_path.write_bytes(b"".join(pem.bytes() for pem in self._cert.cert_chain_pems))
        self.key_path.touch(mode=0o600)
        self._cert.private_key_pem.write_to_path(str(self.key_path))

    def contexts(self) -> tuple[ssl_module.SSLContext, ssl_module.SSLContext]:
        server_side = ssl_module.create_default_context(ssl_module.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(server_side)
        client_side = ssl_module.create_default_context(ssl_module.Purpose.SERVER_AUTH)
        self._ca.configure_trust(client_side)
        return server_side, client_side


_WATCHDOG_SCRIPT = """# aiopg_resilient.testing watchdog
import os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
pid = 0
for line in sys.stdin:
    pid = int(line)
if pid:
    try:
        os.killpg(pid, signal.SIGQUIT)
        for _ in range(50):
            time.sleep(0.1)
            os.killpg(pid, 0)
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class _Watchdog:
    """A tiny process that cleans up after us if we die without closing the server.

    atexit does not run when the test process is killed (``timeout`` sends SIGTERM, CI
    runners SIGKILL). The watchdog reads the postmaster's pid from a pipe; when the pipe
    closes without a final ``0`` (our process is gone), it shuts the postmaster's process
    group down and removes the temporary directory.
    """

    def __init__(self, root: Path) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG_SCRIPT, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def watch(self, pid: int) -> None:
        """Tell the watchdog which postmaster to kill (0: none is running)."""
        stdin = self._proc.stdin
        if stdin is None or stdin.closed:
            return
        with contextlib.suppress(OSError):
            stdin.write(b"%d\n" % pid)
            stdin.flush()

    def close(self) -> None:
        """Dismiss the watchdog (after the server is stopped) and reap it."""
        self.watch(0)
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(_ESCALATION_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# --- backends ---------------------------------------------------------------------------------


class _Backend:
    """What `PostgresServer` delegates to. The base class is a server it cannot control."""

    name: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    user: str = _SUPERUSER
    password: str = ""
    dbname: str = _DBNAME
    ssl: bool = True
    ca_path: Path | None = None
    log_path: Path | None = None
    data_dir: Path | None = None

    def open(self) -> None:
        """Bring the server up for the first time."""

    def close(self) -> None:
        """Stop the server for good and remove everything it left on disk."""

    @property
    def running(self) -> bool:
        return True

    @property
    def dsn(self) -> str:
        return _tcp_dsn(self.host, self.port, self.user, self.password, self.dbname, self.ca_path)

    def admin_conninfo(self) -> str:
        return make_conninfo(self.dsn, application_name=_ADMIN_APPLICATION_NAME)

    def start(self) -> None:
        raise _no_control("starting the server")

    def stop(self, mode: StopMode, timeout: float) -> None:
        raise _no_control("stopping the server")

    def ssl_contexts(self) -> tuple[ssl_module.SSLContext, ssl_module.SSLContext]:
        raise _no_control("proxy_ssl_contexts()")


class _EnvBackend(_Backend):
    """An existing server named by ``AIOPG_RESILIENT_TEST_DSN``."""

    name = "env"

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        params = conninfo_to_dict(dsn)
        env = os.environ

        def get(key: str, env_key: str, default: str) -> str:
            return str(params.get(key) or env.get(env_key) or default)

        self.host = get("host", "PGHOST", "") or get("hostaddr", "PGHOSTADDR", "localhost")
        self.port = int(get("port", "PGPORT", "5432").split(",")[0])
        self.user = get("user", "PGUSER", _SUPERUSER)
        self.password = get("password", "PGPASSWORD", "")
        self.dbname = get("dbname", "PGDATABASE", self.user)
        sslrootcert = get("sslrootcert", "PGSSLROOTCERT", "")
        self.ca_path = Path(sslrootcert) if sslrootcert else None
        sslmode = get("sslmode", "PGSSLMODE", "prefer")
        self.ssl = sslmode in ("require", "verify-ca", "verify-full")

    @property
    def dsn(self) -> str:
        return self._dsn


class _LocalBackend(_Backend):
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
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        for key in ("PGDATA", "PGPORT", "PGHOST"):
            env.pop(key, None)
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

    def open(self) -> None:
        started = time.monotonic()
        tmp = "/tmp" if self._account is not None and os.path.isdir("/tmp") else None
        self._root = root = Path(tempfile.mkdtemp(prefix="aiopg-resilient-pg-", dir=tmp))
        try:
            self._watchdog = _Watchdog(root)
        except OSError as exc:  # e.g. no sys.executable when embedded
            logger.warning("no watchdog for the test server (%s); relying on atexit", exc)
        self.data_dir = root / "data"
        self.log_path = self.data_dir / "postgres.log"
        self._socket_dir = root / "sockets"
        self._socket_dir.mkdir(mode=0o700)
        if self.ssl:
            self._tls = _Tls(root / "tls")
            self.ca_path = self._tls.ca_path
        pwfile = root / "pwfile"
        pwfile.touch(mode=0o600)
        pwfile.write_text(self.password + "\n")
        self._chown_tree(root)
        result = subprocess.run(
            [
                str(self._bindir / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username",
                _SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=False,
            **self._child_kwargs(),
        )
        pwfile.unlink()
        if result.returncode != 0:
            output = result.stdout.decode("utf-8", "replace")[-4000:]
            raise RuntimeError(f"initdb failed (exit code {result.returncode}):\n{output}")
        self._write_config()
        self._spawn_ready()
        logger.info(
            "PostgreSQL started on %s:%d in %.2f s (data dir %s)",
            self.host,
            self.port,
            time.monotonic() - started,
            self.data_dir,
        )

    def _write_config(self) -> None:
        assert self.data_dir is not None
        assert self._socket_dir is not None
        settings: dict[str, str] = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self._socket_dir),
            "ssl": "on" if self._tls else "off",
            # fsync=off is safe for a throwaway server the OS keeps running, but
            # synchronous_commit stays on: with it off, `stop -m immediate` would lose
            # commits already acknowledged to clients (still in shared WAL buffers),
            # which is exactly what the write tests must be able to rule out.
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "wal_level": "replica",
            "max_wal_senders": "5",
            "shared_buffers": "32MB",
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

    def ssl_contexts(self) -> tuple[ssl_module.SSLContext, ssl_module.SSLContext]:
        if self._tls is None:
            raise RuntimeError("proxy_ssl_contexts() needs a server started with ssl=True")
        return self._tls.contexts()


class _ExitedEarly(Exception):
    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail


class _DockerBackend(_Backend):
    """``postgres:15`` in a container through testcontainers (thin; signals via the SDK)."""

    name = "docker"

    def __init__(self, *, ssl: bool, port: int | None, settings: Mapping[str, str]) -> None:
        self.ssl = ssl
        self.port = port if port is not None else 0
        self._settings = dict(settings)
        self.password = secrets.token_urlsafe(24)
        self._root: Path | None = None
        self._tls: _Tls | None = None
        self._container: Any = None

    def open(self) -> None:
        container_module: Any = importlib.import_module("testcontainers.core.container")
        self._root = root = Path(tempfile.mkdtemp(prefix="aiopg-resilient-pg-"))
        if self.port == 0:
            self.port = _free_port()
        settings = {
            # fsync=off is safe for a throwaway server the OS keeps running, but
            # synchronous_commit stays on: with it off, `stop -m immediate` would lose
            # commits already acknowledged to clients (still in shared WAL buffers),
            # which is exactly what the write tests must be able to rule out.
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "wal_level": "replica",
            "max_wal_senders": "5",
            "shared_buffers": "32MB",
        }
        script = 'exec docker-entrypoint.sh "$@"'
        if self.ssl:
            self._tls = _Tls(root / "tls")
            self.ca_path = self._tls.ca_path
            # The container reads the files as another uid; the key is copied inside with the
            # owner and mode PostgreSQL insists on.
            os.chmod(root / "tls", 0o755)
            os.chmod(self._tls.key_path, 0o644)
            script = (
                "set -e; d=/var/lib/postgresql; "
                "install -o postgres -g postgres -m 0600 /tls/server.key $d/server.key; "
                "install -o postgres -g postgres -m 0644 /tls/server.crt $d/server.crt; " + script
            )
            settings.update(
                ssl="on",
                ssl_cert_file="/var/lib/postgresql/server.crt",
                ssl_key_file="/var/lib/postgresql/server.key",
            )
        settings.update(self._settings)
        command = ["postgres"]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        container = (
            container_module.DockerContainer(_DOCKER_IMAGE)
            .with_env("POSTGRES_PASSWORD", self.password)
            .with_bind_ports(5432, self.port)
            .with_command(command)
            .with_kwargs(entrypoint=["bash", "-c", script, "bash"])
        )
        if self._tls is not None:
            container = container.with_volume_mapping(str(root / "tls"), "/tls", "ro")
        self._container = container
        container.start()
        host = str(container.get_container_host_ip())
        self.host = "127.0.0.1" if host in ("localhost", "127.0.0.1") else host
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _DOCKER_START_TIMEOUT
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL in Docker did not accept connections within "
                        f"{_DOCKER_START_TIMEOUT:.0f} s: {exc}"
                    ) from None
            time.sleep(0.2)

    @property
    def running(self) -> bool:
        if self._container is None:
            return False
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return bool(wrapped.status == "running")

    def start(self) -> None:
        if self.running:
            return
        self._container.get_wrapped_container().start()
        self._wait_ready()

    def stop(self, mode: StopMode, timeout: float) -> None:
        if not self.running:
            return
        wrapped = self._container.get_wrapped_container()
        wrapped.kill(signal=_MODE_SIGNALS[mode])
        try:
            wrapped.wait(timeout=timeout)
        except Exception:
            logger.warning("PostgreSQL in Docker did not stop in %s mode; killing it", mode)
            wrapped.kill()
            wrapped.wait(timeout=_ESCALATION_TIMEOUT)

    def close(self) -> None:
        try:
            if self._container is not None:
                self._container.stop()
                self._container = None
        finally:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None

    def ssl_contexts(self) -> tuple[ssl_module.SSLContext, ssl_module.SSLContext]:
        if self._tls is None:
            raise RuntimeError("proxy_ssl_contexts() needs a server started with ssl=True")
        return self._tls.contexts()


# Backends that hold a process or container, closed at interpreter exit if still open.
_OPEN_BACKENDS: set[_Backend] = set()
_OPEN_LOCK = threading.Lock()


@atexit.register
def _close_leftovers() -> None:
    with _OPEN_LOCK:
        leftovers = list(_OPEN_BACKENDS)
        _OPEN_BACKENDS.clear()
    for backend in leftovers:
        try:
            backend.close()
        except Exception:
            logger.exception("could not close a leftover test PostgreSQL server")


# --- public class -----------------------------------------------------------------------------


class PostgresServer:
    """A throwaway PostgreSQL server with ``ssl=on``, for tests.

    Use it as a context manager, sync or async; the server starts on entry and is stopped and
    deleted on exit::

        with PostgresServer() as pg:                  # e.g. in a session-scoped fixture
            psycopg.connect(pg.dsn)                   # verify-full TLS, password auth

        async with PostgresServer(settings={"idle_session_timeout": "1s"}) as pg:
            await pg.restart("fast")                  # every client gets AdminShutdown
            await pg.terminate_backends(application_name="worker")

    The async methods run their blocking work in a worker thread and never block the event
    loop (cancelling one waits for the step in progress to finish); each has a ``*_sync`` twin
    for code outside an event loop. Stopping a stopped server and starting a running one do
    nothing. Closing, at interpreter exit at the latest, stops the server and deletes its
    files; if the process is killed instead, a watchdog process does it.

    Args:
        ssl: Turn TLS on, with a CA and a server certificate (for ``localhost``,
            ``127.0.0.1`` and ``::1``) made for this run. `dsn` then uses
            ``sslmode=verify-full``; with ``ssl=False`` it uses ``sslmode=disable``.
        port: TCP port on 127.0.0.1; None picks a free one. Restarts keep the port.
        settings: Extra ``postgresql.conf`` settings, applied after ours.
        backend: ``"auto"``, ``"local"``, ``"env"`` or ``"docker"`` (see the module doc).
    """

    def __init__(
        self,
        *,
        ssl: bool = True,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        backend: BackendName = "auto",
    ) -> None:
        if backend not in ("auto", "local", "env", "docker"):
            raise ValueError(f"backend must be 'auto', 'local', 'env' or 'docker', not {backend!r}")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be between 1 and 65535, not {port}")
        settings = dict(settings or {})
        for key, value in settings.items():
            if not _SETTING_NAME.match(key):
                raise ValueError(f"not a PostgreSQL setting name: {key!r}")
            if not isinstance(value, str) or "\n" in value or "\r" in value or "\0" in value:
                raise ValueError(f"setting {key!r} needs a one-line string value")
        self._ssl = ssl
        self._port = port
        self._settings = settings
        self._requested_backend: BackendName = backend
        self._backend: _Backend | None = None
        self._closed = False
        self._lock = threading.RLock()

    # -- lifecycle --

    def _resolve(self) -> _Backend:
        """Choose the backend, as `backend` asks, or raise ServerUnavailable."""
        wanted = self._requested_backend
        env_dsn = os.environ.get(ENV_DSN)
        if wanted in ("auto", "env") and env_dsn:
            if self._settings or not self._ssl or self._port is not None:
                logger.warning(
                    "using the existing server named by %s: ssl, port and settings are ignored",
                    ENV_DSN,
                )
            return _EnvBackend(env_dsn)
        if wanted == "env":
            raise ServerUnavailable(f"backend='env' needs {ENV_DSN} set to a libpq DSN")
        reasons: list[str] = []
        if wanted in ("auto", "local"):
            bindir = _find_bindir()
            if bindir is not None:
                return _LocalBackend(
                    bindir, ssl=self._ssl, port=self._port, settings=self._settings
                )
            where = (
                f"{ENV_BINDIR}={os.environ[ENV_BINDIR]}"
                if os.environ.get(ENV_BINDIR)
                else ("PATH, pg_config --bindir or /usr/lib/postgresql/*/bin")
            )
            reasons.append(f"no PostgreSQL server binaries (postgres, initdb) in {where}")
        if wanted in ("auto", "docker"):
            if _docker_usable():
                return _DockerBackend(ssl=self._ssl, port=self._port, settings=self._settings)
            reasons.append("Docker with testcontainers is not usable")
        raise ServerUnavailable(
            f"no PostgreSQL server for tests ({'; '.join(reasons)}): {_INSTALL_HINT}"
        )

    def open_sync(self) -> None:
        """Start the server (or attach to the ``env`` one); does nothing if already open."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this PostgresServer is closed; create a new one")
            if self._backend is not None:
                return
            backend = self._resolve()
            with _OPEN_LOCK:
                _OPEN_BACKENDS.add(backend)
            try:
                backend.open()
            except BaseException:
                self._forget(backend)
                backend.close()
                raise
            self._backend = backend

    async def open(self) -> None:
        """Async `open_sync`."""
        await anyio.to_thread.run_sync(self.open_sync)

    def close_sync(self) -> None:
        """Stop the server (fast, then immediate, then SIGKILL) and delete its files."""
        with self._lock:
            self._closed = True
            backend, self._backend = self._backend, None
            if backend is not None:
                self._forget(backend)
                backend.close()

    async def close(self) -> None:
        """Async `close_sync`; not interrupted by cancellation."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.close_sync)

    @staticmethod
    def _forget(backend: _Backend) -> None:
        with _OPEN_LOCK:
            _OPEN_BACKENDS.discard(backend)

    def __enter__(self) -> PostgresServer:
        self.open_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_sync()

    async def __aenter__(self) -> PostgresServer:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _open_backend(self) -> _Backend:
        backend = self._backend
        if backend is None:
            raise RuntimeError(
                "this PostgresServer is not open: use `with PostgresServer() as pg:` "
                "or `async with`"
            )
        return backend

    # -- faults --

    def start_sync(self) -> None:
        """Start the server if it is not running (opening it first if need be); wait until ready.

        Raises:
            ServerControlUnavailable: on the ``env`` backend.
        """
        with self._lock:
            if self._backend is None:
                self.open_sync()
            self._open_backend().start()

    async def start(self) -> None:
        """Async `start_sync`."""
        await anyio.to_thread.run_sync(self.start_sync)

    def stop_sync(self, mode: StopMode = "fast", *, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the server as ``pg_ctl stop -m mode`` would, and wait until it has exited.

        ``smart`` waits for clients to disconnect, ``fast`` terminates them (they get
        ``AdminShutdown``), ``immediate`` quits without a clean shutdown (crash recovery on the
        next start). If the server is still up after ``timeout`` seconds, the next mode is
        tried, and finally SIGKILL. Files and port are kept for `start_sync`.

        Raises:
            ServerControlUnavailable: on the ``env`` backend.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be 'smart', 'fast' or 'immediate', not {mode!r}")
        with self._lock:
            if self._backend is None:
                if self._requested_backend == "env":
                    raise _no_control("stopping the server")
                return
            self._backend.stop(mode, timeout)
            logger.info("PostgreSQL on port %d stopped (%s)", self._backend.port, mode)

    async def stop(self, mode: StopMode = "fast", *, timeout: float = _STOP_TIMEOUT) -> None:
        """Async `stop_sync`."""
        await anyio.to_thread.run_sync(lambda: self.stop_sync(mode, timeout=timeout))

    def restart_sync(self, mode: StopMode = "fast") -> None:
        """Stop the server in ``mode``, then start it again on the same port; wait until ready.

        Raises:
            ServerControlUnavailable: on the ``env`` backend.
        """
        with self._lock:
            self._open_backend()
            self.stop_sync(mode)
            self.start_sync()

    async def restart(self, mode: StopMode = "fast") -> None:
        """Async `restart_sync`."""
        await anyio.to_thread.run_sync(lambda: self.restart_sync(mode))

    def terminate_backends_sync(self, application_name: str | None = None) -> int:
        """``pg_terminate_backend`` every client backend but our own; return how many died.

        With ``application_name``, only backends with that application name are terminated.
        Waits (up to 5 s each, on PostgreSQL 14 and later) until they have exited.
        """
        with psycopg.connect(self._open_backend().admin_conninfo(), autocommit=True) as conn:
            pids = [
                pid
                for (pid,) in conn.execute(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                    " AND (%(name)s::text IS NULL OR application_name = %(name)s)",
                    {"name": application_name},
                )
            ]
            if not pids:
                return 0
            # Signal them all at once (as a restart or a failover would), then wait until
            # every one has exited, so callers see the outcome when this returns.
            killed = len(
                [
                    ok
                    for (ok,) in conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", [pids]
                    )
                    if ok
                ]
            )
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s::int[])", [pids]
                ).fetchone()
                if row is None or row[0] == 0:
                    break
                time.sleep(0.005)
        logger.info("terminated %d PostgreSQL backend(s)", killed)
        return killed

    async def terminate_backends(self, application_name: str | None = None) -> int:
        """Async `terminate_backends_sync`."""
        return await anyio.to_thread.run_sync(
            lambda: self.terminate_backends_sync(application_name)
        )

    def execute_sync(
        self,
        sql: str | SQL | Composed,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one statement as superuser, in autocommit; return its rows (``[]`` if none)."""
        with psycopg.connect(self._open_backend().admin_conninfo(), autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    async def execute(
        self,
        sql: str | SQL | Composed,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
    ) -> list[tuple[Any, ...]]:
        """Async `execute_sync`: an admin helper for tests (create tables, read pg_stat_*)."""
        return await anyio.to_thread.run_sync(lambda: self.execute_sync(sql, params))

    # -- connection details --

    @property
    def backend(self) -> str:
        """``"local"``, ``"env"`` or ``"docker"`` once open; the requested value before."""
        return self._backend.name if self._backend is not None else self._requested_backend

    @property
    def running(self) -> bool:
        """True while the server accepts connections (always True on the ``env`` backend)."""
        return self._backend is not None and self._backend.running

    @property
    def ssl(self) -> bool:
        """Whether the server has TLS on (``env``: whether the DSN requires TLS)."""
        return self._backend.ssl if self._backend is not None else self._ssl

    @property
    def host(self) -> str:
        """Host to connect to: ``127.0.0.1``, which the server certificate covers."""
        return self._open_backend().host

    @property
    def port(self) -> int:
        """TCP port; the same across restarts."""
        return self._open_backend().port

    @property
    def user(self) -> str:
        """Superuser name (``postgres``)."""
        return self._open_backend().user

    @property
    def password(self) -> str:
        """Superuser password, random per run."""
        return self._open_backend().password

    @property
    def dbname(self) -> str:
        """Database name (``postgres``)."""
        return self._open_backend().dbname

    @property
    def ca_path(self) -> Path | None:
        """PEM file of the CA that signed the server certificate; None without TLS."""
        return self._open_backend().ca_path

    @property
    def log_path(self) -> Path | None:
        """The server's log file (local backend only), for diagnosing test failures."""
        return self._open_backend().log_path

    @property
    def data_dir(self) -> Path | None:
        """The data directory (local backend only)."""
        return self._open_backend().data_dir

    @property
    def dsn(self) -> str:
        """libpq key=value DSN: password auth, ``sslmode=verify-full`` against `ca_path`."""
        return self._open_backend().dsn

    def conninfo(self, **overrides: str | int | None) -> str:
        """`dsn` with keys replaced or added; a None value removes the key.

        Example: ``pg.conninfo(host=proxy.host, port=proxy.port, sslmode="disable")``.
        """
        params = conninfo_to_dict(self.dsn)
        for key, value in overrides.items():
            if value is None:
                params.pop(key, None)
            else:
                params[key] = value
        return make_conninfo("", **params)

    def proxy_ssl_contexts(self) -> tuple[ssl_module.SSLContext, ssl_module.SSLContext]:
        """TLS contexts for a TLS-terminating proxy in front of this server.

        Returns ``(server_side, client_side)``: the first presents a certificate for
        ``localhost``/``127.0.0.1`` signed by the same CA as the server's (for the proxy's
        clients), the second trusts that CA (for the proxy's own TLS to the server).

        Raises:
            RuntimeError: if the server runs without TLS.
            ServerControlUnavailable: on the ``env`` backend.
        """
        return self._open_backend().ssl_contexts()

    def __repr__(self) -> str:
        backend = self._backend
        if backend is None:
            state = "closed" if self._closed else "not open"
            return f"<PostgresServer backend={self._requested_backend!r} {state}>"
        state = "running" if backend.running else "stopped"
        return (
            f"<PostgresServer backend={backend.name!r} host={backend.host!r} "
            f"port={backend.port} {state}>"
        )


PostgresServer.__module__ = "aiopg_resilient.testing"
