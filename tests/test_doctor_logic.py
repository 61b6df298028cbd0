"""The doctor's pure logic, without a server: DSN handling, certificate reading, the
severities of the TLS, server, pooler and client checks (test_doctor_report.py has the
rest). The builders here (`dsn`, `host`, `facts`...) make facts as the probes would."""

from __future__ import annotations

import datetime
import ssl
import sys

import pytest
import trustme

from aiopg_resilient.cli.doctor._assess_client import assess_client
from aiopg_resilient.cli.doctor._assess_pooler import assess_pooler, pool_mode
from aiopg_resilient.cli.doctor._assess_roles import assess_roles
from aiopg_resilient.cli.doctor._assess_server import assess_server
from aiopg_resilient.cli.doctor._assess_tls import assess_tls
from aiopg_resilient.cli.doctor._cert import from_der, from_ssl_dict, hostname_matches
from aiopg_resilient.cli.doctor._model import (
    CertInfo,
    Finding,
    HostReport,
    LadderStep,
    PoolerFacts,
    ServerFacts,
    Setting,
    Severity,
    SocketOptions,
    Target,
    TlsProbe,
)
from aiopg_resilient.cli.doctor._target import Dsn, DsnError, parse_dsn

NOW = 1_800_000_000.0
DAY = 86400.0
SECRET = "s3cr3t-Pa55word"
TARGET = Target("db.example", None, "5432")


def dsn(
    text: str = f"host=db.example user=app password={SECRET} dbname=app sslmode=verify-full",
) -> Dsn:
    return parse_dsn(text, {})


def codes(findings: list[Finding], severity: Severity | None = None) -> set[str]:
    return {f.code for f in findings if severity is None or f.severity is severity}


def facts(**changes: object) -> ServerFacts:
    settings = {
        "max_connections": Setting("100"),
        "superuser_reserved_connections": Setting("3"),
        "idle_session_timeout": Setting("0", "ms", "default"),
        "idle_in_transaction_session_timeout": Setting("60000", "ms", "configuration file"),
        "statement_timeout": Setting("0", "ms", "default"),
        "tcp_keepalives_idle": Setting("10", "s", "configuration file"),
        "tcp_keepalives_interval": Setting("5", "s", "configuration file"),
        "tcp_keepalives_count": Setting("3", None, "configuration file"),
        "tcp_user_timeout": Setting("0", "ms", "default"),
        "client_connection_check_interval": Setting("5000", "ms", "configuration file"),
    }
    settings.update(changes.pop("settings", {}))  # type: ignore[call-overload]
    values: dict[str, object] = {
        "version": "15.18",
        "in_recovery": False,
        "read_only": False,
        "settings": settings,
        "others": 5,
        "superuser": False,
        "server_pid": 10,
        "login_pid": 10,
        "sslmode": "verify-full",
        "encrypted": True,
    }
    values.update(changes)
    return ServerFacts(**values)  # type: ignore[arg-type]


def cert(**changes: object) -> CertInfo:
    values: dict[str, object] = {
        "subject": "CN=db.example",
        "issuer": "CN=Test CA",
        "not_before": NOW - 100 * DAY,
        "not_after": NOW + 300 * DAY,
        "dns_names": ("db.example",),
    }
    values.update(changes)
    return CertInfo(**values)  # type: ignore[arg-type]


def ladder(*working: str, encrypted_from: str = "prefer") -> tuple[LadderStep, ...]:
    modes = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
    steps = []
    for mode in modes:
        if mode in working:
            encrypted = modes.index(mode) >= modes.index(encrypted_from)
            verified = {"verify-ca": "certificate", "verify-full": "certificate and host name"}
            steps.append(
                LadderStep(mode, True, encrypted=encrypted, verified=verified.get(mode, ""))
            )
        else:
            steps.append(LadderStep(mode, False, error="certificate verify failed"))
    return tuple(steps)


ALL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def host(**changes: object) -> HostReport:
    values: dict[str, object] = {
        "target": TARGET,
        "addresses": ("192.0.2.1",),
        "tcp_ms": 0.5,
        "tls": TlsProbe(True, protocol="TLSv1.3", cert=cert(), chain_ok=True, hostname_ok=True),
        "login_ms": 12.0,
        "ladder": ladder(*ALL_MODES),
        "facts": facts(),
    }
    values.update(changes)
    return HostReport(**values)  # type: ignore[arg-type]


# --- the DSN ------------------------------------------------------------------------------


def test_dsn_hosts_ports_and_effective_settings() -> None:
    """Each host of a multi-host DSN is a target; PG* variables fill what the DSN omits."""
    parsed = parse_dsn("host=a,b,/tmp port=5432,6432,5433 dbname=x", {"PGSSLMODE": "require"})
    assert [(t.host, t.port, t.is_socket) for t in parsed.targets] == [
        ("a", "5432", False),
        ("b", "6432", False),
        ("/tmp", "5433", True),
    ]
    assert parsed.sslmode == "require"
    assert parsed.target_session_attrs == "any"
    one_port = parse_dsn("host=a,b port=7000", {})
    assert [t.port for t in one_port.targets] == ["7000", "7000"]
    pinned = parse_dsn("host=a,b target_session_attrs=read-write", {})
    conninfo = pinned.for_target(pinned.targets[1], sslmode="disable")
    assert "host=b" in conninfo
    assert "sslmode=disable" in conninfo
    assert "target_session_attrs" not in conninfo


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("host=a sslmode=bogus", "sslmode='bogus' is not one of"),
        ("host=a,b port=1,2,3", "3 ports for 2 hosts"),
        ("host=a port=99999", "not a TCP port"),
        ("host=a target_session_attrs=writer", "target_session_attrs='writer'"),
        ("host=a keepalives_idle=soon", "keepalives_idle='soon' must be an integer"),
        (f"host=a password={SECRET} nonsense", "invalid connection string"),
    ],
)
def test_bad_dsn_says_what_to_fix(text: str, says: str) -> None:
    """A DSN libpq would reject is refused with a message naming the fix, no secret."""
    with pytest.raises(DsnError, match=says) as info:
        parse_dsn(text, {})
    assert SECRET not in str(info.value)


def test_masked_dsn_has_no_password() -> None:
    """The printed DSN, in key=value or URL form, masks the password."""
    for text in (
        f"host=db user=app password={SECRET}",
        f"postgresql://app:{SECRET}@db:5432/app?sslpassword={SECRET}",
    ):
        parsed = dsn(text)
        assert SECRET not in parsed.masked
        assert "password=***" in parsed.masked
        assert SECRET not in parsed.label
        assert SECRET in parsed.secrets


# --- certificates -------------------------------------------------------------------------


def test_certificate_read_from_der_and_from_ssl() -> None:
    """A certificate's names and dates, with cryptography or from ssl's decoded form."""
    ca = trustme.CA()
    end = datetime.datetime(2030, 1, 2, tzinfo=datetime.timezone.utc)
    leaf = ca.issue_cert("db.example", "10.0.0.5", not_after=end)
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    info = from_der(der)
    assert info is not None
    assert info.dns_names == ("db.example",)
    assert info.ip_addresses == ("10.0.0.5",)
    assert info.not_after == end.timestamp()
    decoded = from_ssl_dict(
        {
            "subject": ((("commonName", "db.example"),),),
            "issuer": ((("commonName", "CA"),),),
            "notBefore": "Jan  1 00:00:00 2020 GMT",
            "notAfter": "Jan  2 00:00:00 2030 GMT",
            "subjectAltName": (("DNS", "db.example"), ("IP Address", "10.0.0.5")),
        }
    )
    assert decoded is not None
    assert (decoded.dns_names, decoded.ip_addresses) == (info.dns_names, info.ip_addresses)
    assert decoded.not_after == info.not_after
    assert decoded.common_name == "db.example"


@pytest.mark.parametrize(
    ("dns", "ips", "cn", "host", "matches"),
    [
        (("db.example",), (), None, "db.example", True),
        (("DB.Example.",), (), None, "db.example", True),
        (("*.example",), (), None, "db.example", True),
        (("*.example",), (), None, "a.db.example", False),
        (("otherhost",), (), None, "127.0.0.1", False),
        ((), ("127.0.0.1",), None, "127.0.0.1", True),
        ((), ("::1",), None, "0:0::1", True),
        ((), (), "db.example", "db.example", True),
        (("x.example",), (), "db.example", "db.example", False),  # CN only without SANs
    ],
)
def test_hostname_matching(
    dns: tuple[str, ...], ips: tuple[str, ...], cn: str | None, host: str, matches: bool
) -> None:
    """Host names match as libpq's verify-full checks them."""
    info = cert(dns_names=dns, ip_addresses=ips, common_name=cn)
    assert hostname_matches(info, host) is matches


def test_without_cryptography_der_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_der() says None (not an ImportError) when cryptography is not installed."""
    monkeypatch.setitem(sys.modules, "cryptography", None)
    assert from_der(b"not even a certificate") is None


# --- TLS checks ---------------------------------------------------------------------------


def _tls(findings: list[Finding], code: str) -> Finding:
    (found,) = [f for f in findings if f.code == code]
    return found


def test_certificate_expiry_severities() -> None:
    """Expired or not yet valid is a problem, under 30 days a warning, else ok."""
    for not_after, severity in ((NOW - DAY, Severity.PROBLEM), (NOW + 10 * DAY, Severity.WARNING)):
        report = host(tls=TlsProbe(True, cert=cert(not_after=not_after)))
        assert _tls(assess_tls(dsn(), report, NOW), "cert.expiry").severity is severity
    early = host(tls=TlsProbe(True, cert=cert(not_before=NOW + DAY)))
    assert _tls(assess_tls(dsn(), early, NOW), "cert.expiry").severity is Severity.PROBLEM
    assert _tls(assess_tls(dsn(), host(), NOW), "cert.expiry").severity is Severity.OK


def test_expiry_without_cryptography_comes_from_the_verification_error() -> None:
    """With no certificate parsed, ssl's "certificate has expired" still names it."""
    probe = TlsProbe(True, chain_ok=False, chain_error="certificate has expired")
    found = _tls(assess_tls(dsn(), host(tls=probe), NOW), "cert.expiry")
    assert found.severity is Severity.PROBLEM
    assert "expired" in found.title


def test_hostname_and_chain_severity_follow_the_sslmode() -> None:
    """A wrong name or an unknown CA is a problem where the sslmode checks it."""
    probe = TlsProbe(
        True,
        cert=cert(dns_names=("otherhost",)),
        chain_ok=False,
        chain_error="unable to get local issuer certificate",
        hostname_ok=False,
        hostname_error="the certificate is for DNS:otherhost, not db.example",
    )
    strict = assess_tls(dsn("host=db.example sslmode=verify-full"), host(tls=probe), NOW)
    assert _tls(strict, "cert.hostname").severity is Severity.PROBLEM
    assert _tls(strict, "cert.chain").severity is Severity.PROBLEM
    lax = assess_tls(dsn("host=db.example sslmode=require"), host(tls=probe), NOW)
    assert _tls(lax, "cert.hostname").severity is Severity.WARNING
    assert _tls(lax, "cert.chain").severity is Severity.WARNING


def test_sslmode_ladder_verdicts() -> None:
    """A DSN sslmode that fails is a problem; one weaker than what works, a warning."""
    weak = assess_tls(dsn("host=db.example sslmode=require"), host(), NOW)
    found = _tls(weak, "tls.sslmode")
    assert found.severity is Severity.WARNING
    assert found.conninfo == {"sslmode": "verify-full"}
    failing = host(ladder=ladder("disable", "allow", "prefer", "require"))
    found = _tls(
        assess_tls(dsn("host=db.example sslmode=verify-full"), failing, NOW), "tls.sslmode"
    )
    assert found.severity is Severity.PROBLEM
    assert "sslmode=require can" in found.title
    good = assess_tls(dsn("host=db.example sslmode=verify-full"), host(), NOW)
    assert _tls(good, "tls.sslmode").severity is Severity.OK


def test_no_tls_on_the_server() -> None:
    """No TLS is a problem when the sslmode requires it, a warning when it allows clear."""
    plain = host(
        tls=TlsProbe(False), ladder=ladder("disable", "allow", "prefer", encrypted_from="require")
    )
    required = assess_tls(dsn("host=db.example sslmode=verify-full"), plain, NOW)
    assert _tls(required, "tls.server").severity is Severity.PROBLEM
    allowed = assess_tls(dsn("host=db.example sslmode=prefer"), plain, NOW)
    assert _tls(allowed, "tls.server").severity is Severity.WARNING
    assert "tls.sslmode" not in codes(allowed)


# --- server checks ------------------------------------------------------------------------


def test_connection_slots() -> None:
    """Nearly full is a problem, three quarters used a warning."""
    for others, severity in ((10, Severity.OK), (75, Severity.WARNING), (90, Severity.PROBLEM)):
        found = _tls(assess_server(host(facts=facts(others=others)), 15.0), "server.connections")
        assert found.severity is severity, others


def test_idle_session_timeout_against_the_heartbeat() -> None:
    """Shorter than twice the heartbeat: a warning with a heartbeat_interval that fits."""
    short = facts(settings={"idle_session_timeout": Setting("10000", "ms", "user")})
    found = _tls(assess_server(host(facts=short), 15.0), "server.idle_session_timeout")
    assert found.severity is Severity.WARNING
    assert found.pool == {"heartbeat_interval": 5.0}
    assert "ALTER ROLE" in found.evidence
    long = facts(settings={"idle_session_timeout": Setting("3600000", "ms", "default")})
    found = _tls(assess_server(host(facts=long), 15.0), "server.idle_session_timeout")
    assert found.severity is Severity.INFO


def test_target_session_attrs_against_roles() -> None:
    """A standby where a primary is wanted is a problem; mixed roles without
    target_session_attrs a warning; libpq skipping a standby is fine."""
    standby = host(facts=facts(in_recovery=True))
    primary = host(target=Target("db2", None, "5432"))
    found = assess_roles(dsn("host=db.example target_session_attrs=read-write"), [standby])
    assert [(f.code, f.severity) for f in found] == [("role.target", Severity.PROBLEM)]
    both = dsn("host=db.example,db2 target_session_attrs=read-write")
    assert assess_roles(both, [standby, primary])[0].severity is Severity.OK
    mixed = assess_roles(dsn("host=db.example,db2"), [standby, primary])
    assert mixed[0].severity is Severity.WARNING
    assert mixed[0].conninfo == {"target_session_attrs": "read-write"}


def test_pooler_mode_and_client_idle_timeout() -> None:
    """PgBouncer's mode comes from SHOW CONFIG or two connections; statement mode and a
    short client_idle_timeout are named."""
    seen = PoolerFacts(server_pid=1, login_pid=2, shared_backend=True)
    assert pool_mode(seen) == "transaction"
    refused = PoolerFacts(
        1, 2, transaction_error="transaction blocks not allowed in statement mode"
    )
    assert pool_mode(refused) == "statement"
    found = assess_pooler(host(pooler=refused), 15.0)
    assert ("pooler.mode", Severity.PROBLEM) in {(f.code, f.severity) for f in found}
    config = PoolerFacts(1, 2, config={"pool_mode": "session", "client_idle_timeout": "5"})
    found = assess_pooler(host(pooler=config), 15.0)
    idle = _tls(found, "pooler.client_idle_timeout")
    assert idle.severity is Severity.WARNING
    assert idle.pool == {"heartbeat_interval": 2.0}


def test_client_keepalives() -> None:
    """keepalives=0 and tcp_user_timeout=0 are warnings; the pool's defaults are ok."""
    off = assess_client(dsn("host=db keepalives=0 tcp_user_timeout=0"), SocketOptions(False))
    assert codes(off, Severity.WARNING) == {"client.keepalives", "client.tcp_user_timeout"}
    assert "SO_KEEPALIVE off" in off[0].evidence
    slow = assess_client(dsn("host=db keepalives_idle=7200"), None)
    assert slow[0].severity is Severity.WARNING
    default = assess_client(dsn("host=db"), SocketOptions(True, 7200, 75, 9, 0))
    assert [(f.code, f.severity) for f in default] == [("client.keepalives", Severity.OK)]
    assert "7200" in default[0].evidence  # what plain libpq would use
