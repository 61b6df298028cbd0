"""The backend interface `PostgresServer` delegates to, and the ``env`` backend.

A backend owns one server: `_Backend.open` brings it up, `_Backend.start` and `_Backend.stop`
control it, `_Backend.close` stops it for good and removes what it left on disk. The base
class is a server it cannot control: `_EnvBackend`, the existing server named by
``AIOPG_RESILIENT_TEST_DSN``, is just that. The ``local`` (`._local`) and ``docker``
(`._docker`) backends subclass it; the names and timeouts they share are defined here.
"""

from __future__ import annotations

import os
import socket
import ssl as ssl_module
from pathlib import Path
from typing import Literal

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._certs import _Tls
from ._errors import ServerControlUnavailable

ENV_DSN = "AIOPG_RESILIENT_TEST_DSN"
"""Environment variable naming an existing server for the ``env`` backend."""

StopMode = Literal["smart", "fast", "immediate"]

_ESCALATION_TIMEOUT = 10.0  # per step when a stop does not finish in time
_ADMIN_APPLICATION_NAME = "aiopg_resilient.testing"
_SUPERUSER = "postgres"
_DBNAME = "postgres"
_MODES: tuple[StopMode, ...] = ("smart", "fast", "immediate")
_MODE_SIGNALS = {"smart": "SIGTERM", "fast": "SIGINT", "immediate": "SIGQUIT"}


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def _local_only(what: str, backend: str) -> ServerControlUnavailable:
    """The error for what only the ``local`` backend (our own data directory) can do."""
    where = (
        f"an existing server named by {ENV_DSN}, which it cannot control"
        if backend == "env"
        else f"the {backend} backend"
    )
    return ServerControlUnavailable(
        f"{what} needs the local backend (PostgreSQL server binaries on this machine); "
        f"this PostgresServer uses {where}"
    )


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

    def recreate(self) -> None:
        """Replace the cluster with a fresh one (initdb) behind the same address."""
        raise _local_only("recreate()", self.name)

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


# Settings of every throwaway server we start (local or in a container). fsync=off is
# safe for a server the OS keeps running, but synchronous_commit stays on: with it off,
# `stop -m immediate` would lose commits already acknowledged to clients (still in
# shared WAL buffers), which is exactly what the write tests must be able to rule out.
THROWAWAY_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "wal_level": "replica",
    "max_wal_senders": "5",
    "shared_buffers": "32MB",
}


class _ControlledBackend(_Backend):
    """A server we started ourselves, with its own throwaway CA when TLS is on."""

    _tls: _Tls | None = None

    def ssl_contexts(self) -> tuple[ssl_module.SSLContext, ssl_module.SSLContext]:
        if self._tls is None:
            raise RuntimeError("proxy_ssl_contexts() needs a server started with ssl=True")
        return self._tls.contexts()
