"""``aiopg-resilient doctor`` against the session's server: read-only checks, and problems
staged without touching what other tests share (a role of our own, a proxy, a standby,
a PgBouncer), each undone afterwards."""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from aiopg_resilient.cli import main
from aiopg_resilient.testing import (
    ChaosProxy,
    PgBouncer,
    PostgresServer,
    ServerControlUnavailable,
    StandbyServer,
)


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run ``aiopg-resilient doctor ARGS`` in-process: (exit status, stdout)."""
    code = main(["doctor", *args])
    out, err = capsys.readouterr()
    assert err == ""
    return code, out


def doctor_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    """Run the doctor with ``--json``: (exit status, the parsed report)."""
    code, out = doctor(capsys, *args, "--json")
    document = json.loads(out)
    assert document["exit_status"] == code
    return code, document


def finding(document: dict[str, Any], code: str) -> dict[str, Any]:
    """The one finding with *code* in a JSON report."""
    found = [f for f in document["findings"] if f["code"] == code]
    assert len(found) == 1, [f["code"] for f in document["findings"]]
    return found[0]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def role_with(pg: PostgresServer, **settings: str) -> Iterator[str]:
    """A login role of our own with *settings* (``ALTER ROLE ... SET``): its DSN; dropped
    afterwards, so the shared server is left as it was."""
    name = f"doctor_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(16)
    pg.execute_sync(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    try:
        for key, value in settings.items():
            pg.execute_sync(f"ALTER ROLE {name} SET {key} = '{value}'")
        yield pg.conninfo(user=name, password=password)
    finally:
        pg.execute_sync(f"DROP ROLE {name}")


def test_healthy_server_gives_short_output_and_exit_0(
    pg: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify-full against a healthy server: three lines, status 0, no password."""
    code, out = doctor(capsys, pg.dsn)
    assert code == 0, out
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert "primary, TLS, certificate and host name verified (sslmode=verify-full)" in lines[1]
    assert "no problem found" in lines[2]
    assert pg.password not in out


def test_json_report_has_stable_keys_and_no_password(
    pg: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json parses, masks the password (key=value and URL DSNs), describes the ladder."""
    url = f"postgresql://{pg.user}:{pg.password}@{pg.host}:{pg.port}/{pg.dbname}"
    url += f"?sslmode=verify-full&sslrootcert={pg.ca_path}"
    for dsn in (pg.dsn, url):
        code, out = doctor(capsys, dsn, "--json", "--verbose")
        assert pg.password not in out
        document = json.loads(out)
        assert code == 0
        assert set(document) >= {
            "schema", "target", "dsn", "status", "exit_status", "counts", "hosts",
            "findings", "idle_probe", "recommendations",
        }  # fmt: skip
        assert document["status"] == "ok"
        assert "password=***" in document["dsn"]
        (host,) = document["hosts"]
        assert host["tls"]["hostname_ok"] is True
        assert host["sslmodes"]["verify-full"]["connects"] is True
        assert host["sslmodes"]["disable"]["encrypted"] is False
        assert host["server"]["role"] == "primary"
        assert finding(document, "cert.expiry")["severity"] == "ok"
    code, out = doctor(capsys, pg.dsn, "--verbose")
    assert pg.password not in out
    assert "what each sslmode gives" in out


def test_console_script_runs_the_doctor(pg: PostgresServer) -> None:
    """``python -m aiopg_resilient doctor`` exits 0 on a healthy server, JSON on stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "aiopg_resilient", "doctor", pg.dsn, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "ok"
    assert pg.password not in proc.stdout + proc.stderr


def test_unreachable_host_exits_3_quickly(
    pg: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening: status 3 at once, the host named, the password not printed."""
    start = time.monotonic()
    code, out = doctor(capsys, pg.conninfo(port=closed_port()))
    assert time.monotonic() - start < 3
    assert code == 3
    assert "nothing answers at this address and port" in out
    assert "Connection refused" in out
    assert "could not log in to any host" in out
    assert pg.password not in out


def test_black_hole_is_bounded_by_the_timeout(
    pg: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A port that accepts and never answers: status 3 within a few --timeout."""
    with ChaosProxy.for_server(pg) as proxy:
        proxy.freeze_new(True)
        assert proxy.dsn is not None
        start = time.monotonic()
        code, document = doctor_json(capsys, proxy.dsn, "--timeout", "1")
        elapsed = time.monotonic() - start
    assert code == 3
    assert document["status"] == "unreachable"
    assert "does not answer like PostgreSQL" in finding(document, "host.reach")["title"]
    assert elapsed < 8


def test_each_host_of_a_multi_host_dsn_is_checked(
    pg: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """One dead host of two: a problem for it (status 1), the other one diagnosed."""
    dead = closed_port()
    dsn = pg.conninfo(host=f"{pg.host},{pg.host}", port=f"{dead},{pg.port}")
    code, document = doctor_json(capsys, dsn)
    assert code == 1
    reach = {f["host"]: f["severity"] for f in document["findings"] if f["code"] == "host.reach"}
    assert reach == {f"{pg.host}:{dead}": "problem", f"{pg.host}:{pg.port}": "ok"}
    assert [h["server"] is not None for h in document["hosts"]] == [False, True]


def test_keepalives_off_is_a_warning(
    pg: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """keepalives=0 in the DSN: a warning seen on the socket, status 0 (1 with --strict)."""
    dsn = pg.conninfo(keepalives=0)
    code, document = doctor_json(capsys, dsn)
    assert code == 0
    found = finding(document, "client.keepalives")
    assert found["severity"] == "warning"
    assert "keepalives=0" in found["title"]
    assert "SO_KEEPALIVE off" in found["evidence"]
    assert document["recommendations"]["conninfo"] == {"keepalives": 1}
    code, out = doctor(capsys, dsn, "--strict")
    assert code == 1
    assert "TCP keepalives are off" in out


def test_idle_session_timeout_is_named(
    pg: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """idle_session_timeout = 2s (for a role of ours): a warning and a heartbeat below it."""
    with role_with(pg, idle_session_timeout="2s") as dsn:
        code, out = doctor(capsys, dsn)
        assert code == 0
        assert "the server ends sessions idle for 2 s (idle_session_timeout)" in out
        assert "ResilientPool(conninfo, heartbeat_interval=1.0)" in out
        code, document = doctor_json(capsys, dsn)
    found = finding(document, "server.idle_session_timeout")
    assert found["severity"] == "warning"
    assert "ALTER ROLE" in found["evidence"]


def test_standby_where_a_primary_is_wanted(
    pg_standby: StandbyServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """target_session_attrs=read-write against a standby: a problem, status 1."""
    code, document = doctor_json(capsys, pg_standby.conninfo(target_session_attrs="read-write"))
    assert code == 1
    found = finding(document, "role.target")
    assert found["severity"] == "problem"
    assert "target_session_attrs=read-write" in found["title"]
    assert document["hosts"][0]["server"]["role"] == "standby"


def test_pgbouncer_in_front_is_detected(
    pg: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """PgBouncer in transaction mode with a short client_idle_timeout: named, with the mode
    and the heartbeat that keeps connections from its idle cut."""
    bouncer = PgBouncer(pg, settings={"client_idle_timeout": "10"})
    try:
        bouncer.open_sync()
    except ServerControlUnavailable as exc:
        pytest.skip(str(exc))
    with bouncer:
        code, document = doctor_json(capsys, bouncer.dsn)
        code_text, out = doctor(capsys, bouncer.dsn)
    assert code == code_text == 0
    found = finding(document, "pooler.detected")
    assert "PgBouncer" in found["title"]
    assert "transaction mode" in found["title"]
    assert document["hosts"][0]["pooler"]["mode"] == "transaction"
    idle = finding(document, "pooler.client_idle_timeout")
    assert idle["severity"] == "warning"
    assert idle["pool"] == {"heartbeat_interval": 5.0}
    assert "through PgBouncer (transaction mode)" in out
    assert pg.password not in out


def test_wrong_password_exits_3_and_still_checks_tls(
    pg: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused login: status 3, named, no sslmode ladder of failed logins, the TLS and
    certificate checks done anyway; neither password printed."""
    wrong = secrets.token_urlsafe(12)
    code, document = doctor_json(capsys, pg.conninfo(password=wrong))
    assert code == 3
    found = finding(document, "host.login")
    assert found["title"] == "the server refuses this login"
    assert "password authentication failed" in found["evidence"]
    assert document["hosts"][0]["sslmodes"] == {}
    assert finding(document, "cert.hostname")["severity"] == "ok"
    code, out = doctor(capsys, pg.conninfo(password=wrong), "--verbose")
    assert wrong not in out
    assert pg.password not in out


def test_certificate_checks_without_cryptography(
    pg: PostgresServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """cryptography is optional: without it the certificate comes from Python's ssl
    (a verified handshake), with the same verdicts."""
    monkeypatch.setitem(sys.modules, "cryptography", None)  # `import cryptography` fails
    code, document = doctor_json(capsys, pg.dsn)
    assert code == 0
    assert finding(document, "cert.expiry")["severity"] == "ok"
    assert finding(document, "cert.hostname")["severity"] == "ok"
    certificate = document["hosts"][0]["tls"]["certificate"]
    assert "127.0.0.1" in certificate["ip_addresses"]
