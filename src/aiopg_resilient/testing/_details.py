"""What a `PostgresServer` tells a test about its server: address, login, DSN, files, TLS.

`_ServerDetails` is the base class of `PostgresServer` that holds its backend (`._backends`)
and reads from it: the host, port and credentials to connect with, the DSN (also with
overrides), the CA, log and data paths, and TLS contexts for a proxy in front of the server.
It only reads; opening, closing and breaking the server is `PostgresServer`'s job (`._server`).
"""

from __future__ import annotations

import ssl as ssl_module
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._backends import _Backend
from ._discovery import BackendName


class _ServerDetails:
    """The connection details of a `PostgresServer`'s backend, once it is open."""

    def __init__(self, *, ssl: bool, backend: BackendName) -> None:
        self._ssl = ssl
        self._requested_backend: BackendName = backend
        self._backend: _Backend | None = None

    def _open_backend(self) -> _Backend:
        backend = self._backend
        if backend is None:
            raise RuntimeError(
                "this PostgresServer is not open: use `with PostgresServer() as pg:` "
                "or `async with`"
            )
        return backend

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
