"""The errors `PostgresServer` raises when it cannot run, or cannot control, a server.

Both are public, as ``aiopg_resilient.testing.ServerUnavailable`` and
``aiopg_resilient.testing.ServerControlUnavailable``.
"""

from __future__ import annotations

__all__ = ["ServerControlUnavailable", "ServerUnavailable"]


class ServerUnavailable(RuntimeError):
    """No way to run a PostgreSQL server for tests was found on this machine.

    The message says what to install: PostgreSQL server binaries, an existing server named by
    ``AIOPG_RESILIENT_TEST_DSN``, or Docker with ``aiopg-resilient[docker]``.
    """


class ServerControlUnavailable(RuntimeError):
    """The server cannot be started, stopped or restarted by this `PostgresServer`.

    Raised by the fault methods and `PostgresServer.proxy_ssl_contexts` on the ``env`` backend
    (an existing server named by ``AIOPG_RESILIENT_TEST_DSN``), which this library does not own;
    and by `PostgresServer.recreate` and `PostgresServer.start_standby` on any backend but
    ``local`` (they need the server binaries and the data directory on this machine).
    """


ServerUnavailable.__module__ = "aiopg_resilient.testing"
ServerControlUnavailable.__module__ = "aiopg_resilient.testing"
