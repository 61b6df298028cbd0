"""``aiopg-resilient doctor`` on a server of this module's own, where problems that touch
the whole server are staged for real and undone: TLS off, an expired certificate, one for
another host, connection slots nearly used up."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import trustme

from aiopg_resilient.testing import PostgresServer
from aiopg_resilient.testing._backends import ENV_DSN

from .test_doctor import doctor, doctor_json, finding

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(bool(os.environ.get(ENV_DSN)), reason=f"{ENV_DSN}: no server control"),
]

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_MAX_CONNECTIONS = 12  # 3 reserved for superusers: 9 for everyone else


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PostgresServer]:
    """A local server for this module alone, with few connection slots."""
    with PostgresServer(settings={"max_connections": str(_MAX_CONNECTIONS)}) as server:
        if server.data_dir is None:
            pytest.skip("staging needs the local backend (a data directory)")
        yield server


def _answer(server: PostgresServer) -> tuple[bytes, bytes | None]:
    """The server's answer to an SSLRequest, and its certificate (DER) if it offers TLS."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(_SSL_REQUEST)
        answer = sock.recv(1)
        if answer != b"S":
            return answer, None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(sock) as tls:
            return answer, tls.getpeercert(binary_form=True)


def _reload_until(server: PostgresServer, done: Callable[[], bool]) -> None:
    """pg_reload_conf(), then wait (bounded) until the server shows the change."""
    server.execute_sync("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, "the server did not take the new configuration"
        time.sleep(0.02)


def _install(server: PostgresServer, leaf: trustme.LeafCert) -> None:
    """Serve *leaf* (ALTER SYSTEM ssl_cert_file/ssl_key_file + reload)."""
    data = server.data_dir
    assert data is not None
    owner = data.stat()
    cert, key = data / "doctor.crt", data / "doctor.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    for path in (cert, key):  # the server's OS user (postgres when we are root) reads them
        os.chown(path, owner.st_uid, owner.st_gid)
    server.execute_sync(f"ALTER SYSTEM SET ssl_cert_file = '{cert}'")
    server.execute_sync(f"ALTER SYSTEM SET ssl_key_file = '{key}'")
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    _reload_until(server, lambda: _answer(server)[1] == der)


@pytest.fixture
def staged_cert(own_pg: PostgresServer) -> Iterator[Callable[[trustme.LeafCert], None]]:
    """Install certificates on `own_pg`; the original one is served again afterwards."""
    original = _answer(own_pg)[1]
    yield lambda leaf: _install(own_pg, leaf)
    own_pg.execute_sync("ALTER SYSTEM RESET ssl_cert_file")
    own_pg.execute_sync("ALTER SYSTEM RESET ssl_key_file")
    _reload_until(own_pg, lambda: _answer(own_pg)[1] == original)


@pytest.fixture
def other_ca(tmp_path: Path) -> tuple[trustme.CA, str]:
    """A CA of the test's own, and its PEM file for sslrootcert."""
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, str(path)


def _utc(days: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)


def test_no_tls_on_the_server(own_pg: PostgresServer, capsys: pytest.CaptureFixture[str]) -> None:
    """ssl = off: a problem for sslmode=verify-full (status 1, read through sslmode=prefer),
    a warning for sslmode=prefer; then ssl is on again."""
    own_pg.execute_sync("ALTER SYSTEM SET ssl = off")
    try:
        _reload_until(own_pg, lambda: _answer(own_pg)[0] == b"N")
        code, document = doctor_json(capsys, own_pg.dsn)
        assert code == 1
        found = finding(document, "tls.server")
        assert found["severity"] == "problem"
        assert "does not offer TLS" in found["title"]
        assert "SHOW ssl = off" in found["evidence"]
        assert finding(document, "tls.sslmode")["severity"] == "problem"
        assert document["hosts"][0]["server"]["sslmode_used"] == "prefer"
        code, out = doctor(capsys, own_pg.conninfo(sslmode="prefer"))
        assert code == 0
        assert "the server does not offer TLS" in out
    finally:
        own_pg.execute_sync("ALTER SYSTEM RESET ssl")
        _reload_until(own_pg, lambda: _answer(own_pg)[0] == b"S")


@pytest.mark.parametrize(
    ("not_after", "severity", "title"),
    [(-30, "problem", "has expired"), (10, "warning", "expires in")],
)
def test_certificate_expiry(
    own_pg: PostgresServer,
    capsys: pytest.CaptureFixture[str],
    staged_cert: Callable[[trustme.LeafCert], None],
    other_ca: tuple[trustme.CA, str],
    not_after: int,
    severity: str,
    title: str,
) -> None:
    """An expired certificate is a problem (verify-full cannot log in); one that expires
    in 10 days a warning."""
    ca, ca_path = other_ca
    staged_cert(
        ca.issue_cert("127.0.0.1", "localhost", not_before=_utc(-400), not_after=_utc(not_after))
    )
    code, document = doctor_json(capsys, own_pg.conninfo(sslrootcert=ca_path))
    found = finding(document, "cert.expiry")
    assert found["severity"] == severity
    assert title in found["title"]
    if severity == "problem":
        assert code == 1
        assert finding(document, "tls.sslmode")["severity"] == "problem"
    else:
        assert code == 0
        assert finding(document, "cert.chain")["severity"] == "ok"
        assert finding(document, "cert.hostname")["severity"] == "ok"


def test_certificate_for_another_host(
    own_pg: PostgresServer,
    capsys: pytest.CaptureFixture[str],
    staged_cert: Callable[[trustme.LeafCert], None],
    other_ca: tuple[trustme.CA, str],
) -> None:
    """A certificate for "otherhost": the host name check is a problem for verify-full,
    the chain is fine, verify-ca still logs in."""
    ca, ca_path = other_ca
    staged_cert(ca.issue_cert("otherhost"))
    code, out = doctor(capsys, own_pg.conninfo(sslrootcert=ca_path))
    assert code == 1
    assert "the server certificate is for another host" in out
    assert "DNS:otherhost, not 127.0.0.1" in out
    code, document = doctor_json(capsys, own_pg.conninfo(sslrootcert=ca_path))
    assert finding(document, "cert.hostname")["severity"] == "problem"
    assert finding(document, "cert.chain")["severity"] == "ok"
    assert document["hosts"][0]["sslmodes"]["verify-ca"]["connects"] is True
    assert document["hosts"][0]["sslmodes"]["verify-full"]["connects"] is False


def test_connection_slots_nearly_used_up(
    own_pg: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seven of the nine slots held elsewhere: the doctor's own makes eight, a problem."""
    held = [psycopg.connect(own_pg.dsn, application_name="holder") for _ in range(7)]
    try:
        code, document = doctor_json(capsys, own_pg.dsn)
    finally:
        for conn in held:
            conn.close()
    assert code == 1
    found = finding(document, "server.connections")
    assert found["severity"] == "problem"
    # "1 of 9 free", or 0 if a backend of an earlier test is still exiting.
    assert "nearly out of connections" in found["title"]
    assert f"of {_MAX_CONNECTIONS - 3} free" in found["title"]
    assert f"max_connections = {_MAX_CONNECTIONS}" in found["evidence"]
