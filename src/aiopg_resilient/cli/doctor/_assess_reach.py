"""Can each host be reached, and logged in to. Pure: facts in, findings out."""

from __future__ import annotations

from ._model import Finding, HostReport, Severity

__all__ = ["assess_reach"]

SLOW_LOGIN_MS = 1000.0
_NOBODY = ("no such file or directory", "connection refused", "could not translate host")
_FULL = ("too many clients", "remaining connection slots", "too many connections")


def assess_reach(host: HostReport) -> list[Finding]:
    """Can the host be reached, and can we log in."""
    label = host.label
    if host.dns_error:
        return [
            Finding(
                "host.reach",
                Severity.PROBLEM,
                "the host name does not resolve",
                host.dns_error,
                "check the host name (and the DNS resolver of this machine)",
                host=label,
            )
        ]
    if host.tcp_error:
        return [
            Finding(
                "host.reach",
                Severity.PROBLEM,
                "nothing answers at this address and port",
                host.tcp_error,
                "check host and port, that the server runs and listens there "
                "(listen_addresses, port) and that no firewall drops the traffic",
                host=label,
            )
        ]
    tls = host.tls
    if host.facts is None and tls is not None and tls.offered is None:
        return [
            Finding(
                "host.reach",
                Severity.PROBLEM,
                "the host accepts TCP connections but does not answer like PostgreSQL",
                f"{tls.error}; login: {host.login_error}",
                "check that this port is PostgreSQL's (not another service, or a proxy or "
                "load balancer with nothing healthy behind it)",
                host=label,
            )
        ]
    findings = []
    if host.tcp_ms is not None or host.login_error is None:
        tcp = f"TCP connect {host.tcp_ms:.1f} ms; " if host.tcp_ms is not None else ""
        addresses = f" ({', '.join(host.addresses)})" if host.addresses else ""
        findings.append(_reach_ok(host, f"{tcp}login {host.login_ms or 0:.0f} ms{addresses}"))
    if host.login_error is not None and host.facts is None:
        findings.append(_login(host))
    return findings


def _reach_ok(host: HostReport, evidence: str) -> Finding:
    if host.login_ms is not None and host.login_ms > SLOW_LOGIN_MS and host.login_error is None:
        return Finding(
            "host.reach",
            Severity.WARNING,
            f"logging in takes {host.login_ms / 1000:.1f} s",
            evidence,
            "every new connection and reconnect pays it: look at DNS, the network path, "
            "TLS and authentication (a slow LDAP or SCRAM iteration count)",
            host=host.label,
        )
    return Finding("host.reach", Severity.OK, "reachable", evidence, host=host.label)


def _login(host: HostReport) -> Finding:
    error = host.login_error or ""
    state = host.login_sqlstate or ""
    lower = error.lower()
    title, action = "logging in fails", "read the server's message above, and its log"
    if state in ("28P01", "28000") or "password" in lower or "pg_hba" in lower:
        title = "the server refuses this login"
        action = (
            "check the user and password (PGPASSWORD, ~/.pgpass, the password= of the DSN) "
            "and the server's pg_hba.conf for this address, user and database"
        )
    elif state == "3D000" or ("database" in lower and "does not exist" in lower):
        title, action = "the database does not exist", "check dbname"
    elif state == "53300" or any(text in lower for text in _FULL):
        title = "the server has no connection slot left"
        action = (
            "raise max_connections (a restart), lower the max_size of the pools using it, "
            "or put PgBouncer in front"
        )
    elif any(text in lower for text in _NOBODY):
        title = "nothing answers there"
        action = (
            "check host and port (for a Unix socket: the directory, and that the server "
            "runs on this machine), and that the server listens there"
        )
    elif state == "57P03" or "the database system is" in lower:
        title = "the server does not accept connections now (starting, stopping, recovering)"
        action = "wait for it, or look at its log"
    return Finding("host.login", Severity.PROBLEM, title, error, action, host=host.label)
