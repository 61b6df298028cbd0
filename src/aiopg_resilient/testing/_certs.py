"""The certificates of a test server with TLS: a throwaway CA and a server certificate.

Made with trustme, an optional dependency (``aiopg-resilient[testing]``) imported only when a
server with ``ssl=True`` is opened; written as files for the server, and turned into
`ssl.SSLContext` pairs for a TLS-terminating proxy in front of it.
"""

from __future__ import annotations

import copy
import ssl as ssl_module
from pathlib import Path

from ._errors import ServerUnavailable


class _Tls:
    """A CA and a server certificate for localhost, 127.0.0.1 and ::1, written as files."""

    ca_path: Path
    cert_path: Path
    key_path: Path

    def __init__(self, directory: Path) -> None:
        try:
            import trustme  # optional dependency, needed only here
        except ImportError as exc:
            raise ServerUnavailable(
                "PostgresServer(ssl=True) needs trustme: pip install 'aiopg-resilient[testing]'"
            ) from exc
        self._ca = trustme.CA(organization_name="aiopg_resilient test CA")
        self._cert = self._ca.issue_cert("localhost", "127.0.0.1", "::1")
        self._write(directory)

    def copy_to(self, directory: Path) -> _Tls:
        """The same CA and certificate, written again in ``directory`` (for a standby)."""
        other = copy.copy(self)
        other._write(directory)
        return other

    def _write(self, directory: Path) -> None:
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
