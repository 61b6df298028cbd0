"""The report as text for people (short unless ``--verbose``) and as JSON for machines.
Pure. Every string leaves through `scrub`: no secret of the DSN is ever printed."""

from __future__ import annotations

import json
import time
from typing import Any

from ._assess_pooler import pool_mode
from ._assess_tls import describe_step
from ._model import Finding, HostReport, Severity
from ._report import Report
from ._target import scrub

__all__ = ["SCHEMA", "to_json", "to_text"]

SCHEMA = 1
"""Version of the JSON layout; bumped only when a key changes meaning or goes away."""
_WIDTH = 9


def _tag(severity: Severity) -> str:
    return ("PROBLEM" if severity is Severity.PROBLEM else severity.label).ljust(_WIDTH)


def _summary(host: HostReport) -> str:
    facts = host.facts
    assert facts is not None
    version = facts.version.split()[0] if facts.version else "?"
    parts = [f"PostgreSQL {version}", "standby" if facts.in_recovery else "primary"]
    steps = {step.sslmode: step for step in host.ladder}
    own = steps.get(facts.sslmode)
    if facts.encrypted:
        checked = f"{own.verified} verified" if own is not None and own.verified else ""
        if own is None and facts.sslmode in ("verify-ca", "verify-full"):
            checked = "verified"
        parts.append(f"TLS, {checked or 'server not verified'} (sslmode={facts.sslmode})")
    elif not host.target.is_socket:
        parts.append(f"NOT encrypted (sslmode={facts.sslmode})")
    if host.pooler is not None:
        mode = pool_mode(host.pooler)
        parts.append(f"through PgBouncer{f' ({mode} mode)' if mode else ''}")
    if host.login_ms is not None and host.login_error is None:
        parts.append(f"login {host.login_ms:.0f} ms")
    elif host.login_error is not None:
        parts.append("read with another sslmode: the DSN's own cannot log in")
    return ", ".join(parts)


def _finding_lines(finding: Finding) -> list[str]:
    where = f"{finding.host}: " if finding.host else ""
    lines = [f"{_tag(finding.severity)}{where}{finding.title}  [{finding.code}]"]
    indent = " " * _WIDTH
    if finding.evidence:
        first, *more = finding.evidence.splitlines()
        lines.append(f"{indent}seen: {first}")
        lines.extend(f"{indent}      {line}" for line in more)
    if finding.action:
        lines.append(f"{indent}do:   {finding.action}")
    return lines


def _recommendation_lines(report: Report) -> list[str]:
    conninfo, pool = report.recommendations()
    if not conninfo and not pool:
        return []
    lines = ["recommended:"]
    if conninfo:
        lines.append("  conninfo  " + " ".join(f"{k}={v}" for k, v in conninfo.items()))
    if pool:
        lines.append(
            "  pool      ResilientPool(conninfo, "
            + ", ".join(f"{k}={v!r}" for k, v in pool.items())
            + ")"
        )
    return lines


def _idle_lines(report: Report) -> list[str]:
    idle = report.idle
    if idle is None or not idle.checks:
        return []
    lines = [f"idle probe on {idle.host} (keepalives off, each connection tested once):"]
    for check in idle.checks:
        state = "alive" if check.alive else f"dead: {check.reason}"
        lines.append(f"  {check.idle:7.2f} s idle  {state}")
    return lines


def to_text(report: Report, *, verbose: bool = False) -> str:
    """The report for a terminal: the hosts, what needs attention, what to change."""
    lines = [f"aiopg-resilient doctor: {report.dsn.label}"]
    if verbose:
        lines.append(f"dsn: {report.dsn.masked}")
    for host in report.hosts:
        if host.facts is not None:
            tag = _tag(Severity.OK if host.login_error is None else Severity.INFO)
            lines.append(f"{tag}{host.label}: {_summary(host)}")
    shown = [f for f in report.findings if verbose or f.severity >= Severity.WARNING]
    for finding in sorted(shown, key=lambda f: -f.severity) if not verbose else shown:
        lines.extend(_finding_lines(finding))
    if verbose:
        lines.extend(_idle_lines(report))
    lines.extend(_recommendation_lines(report))
    problems, warnings = report.count(Severity.PROBLEM), report.count(Severity.WARNING)
    checked = len(report.findings)
    if not report.connected:
        verdict = "could not log in to any host: the checks above are all that could run"
    elif problems or warnings:
        verdict = (
            f"{problems} problem{'s' * (problems != 1)}, "
            f"{warnings} warning{'s' * (warnings != 1)} in {checked} checks"
        )
    else:
        verdict = f"no problem found in {checked} checks" + (
            "" if verbose else " (--verbose for details)"
        )
    lines.append(f"{_tag(_status(report))}{verdict}")
    return scrub("\n".join(lines), report.dsn.secrets)


def _status(report: Report) -> Severity:
    """The verdict's severity: info counts as ok; no login at all as a problem."""
    if not report.connected:
        return Severity.PROBLEM
    return report.worst if report.worst >= Severity.WARNING else Severity.OK


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _host_json(host: HostReport) -> dict[str, Any]:
    tls = host.tls
    cert = tls.cert if tls is not None else None
    facts = host.facts
    pooler = host.pooler
    return {
        "host": host.target.host,
        "hostaddr": host.target.hostaddr,
        "port": host.target.port,
        "addresses": list(host.addresses),
        "error": host.dns_error or host.tcp_error,
        "tcp_ms": host.tcp_ms,
        "login_ms": host.login_ms,
        "login_error": host.login_error,
        "login_sqlstate": host.login_sqlstate,
        "tls": None
        if tls is None
        else {
            "offered": tls.offered,
            "error": tls.error,
            "protocol": tls.protocol,
            "cipher": tls.cipher,
            "chain_ok": tls.chain_ok,
            "chain_error": tls.chain_error,
            "hostname_ok": tls.hostname_ok,
            "trust": tls.trust,
            "certificate": None
            if cert is None
            else {
                "subject": cert.subject,
                "issuer": cert.issuer,
                "not_before": _iso(cert.not_before),
                "not_after": _iso(cert.not_after),
                "dns_names": list(cert.dns_names),
                "ip_addresses": list(cert.ip_addresses),
            },
        },
        "sslmodes": {
            step.sslmode: {
                "connects": step.connected,
                "encrypted": step.encrypted,
                "verified": step.verified or None,
                "gives": describe_step(step),
                "error": step.error,
            }
            for step in host.ladder
        },
        "server": None
        if facts is None
        else {
            "version": facts.version,
            "role": "standby" if facts.in_recovery else "primary",
            "read_only": facts.read_only,
            "superuser": facts.superuser,
            "other_connections": facts.others,
            "sslmode_used": facts.sslmode,
            "encrypted": facts.encrypted,
            "settings": {
                name: {"value": s.value, "unit": s.unit, "source": s.source}
                for name, s in facts.settings.items()
            },
            "socket": None if facts.socket is None else vars_of(facts.socket),
        },
        "pooler": None
        if pooler is None
        else {
            "mode": pool_mode(pooler),
            "login_pid": pooler.login_pid,
            "server_pid": pooler.server_pid,
            "config": None if pooler.config is None else dict(pooler.config),
            "config_error": pooler.config_error,
        },
    }


def vars_of(value: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict (shallow)."""
    return {name: getattr(value, name) for name in value.__dataclass_fields__}


def to_json(report: Report, *, strict: bool = False) -> str:
    """The report as JSON (stable keys, `SCHEMA`)."""
    conninfo, pool = report.recommendations()
    idle = report.idle
    document = {
        "schema": SCHEMA,
        "target": report.dsn.label,
        "dsn": report.dsn.masked,
        "status": _status(report).label if report.connected else "unreachable",
        "exit_status": report.exit_status(strict=strict),
        "counts": {s.label: report.count(s) for s in Severity},
        "hosts": [_host_json(host) for host in report.hosts],
        "findings": [
            {
                "code": f.code,
                "severity": f.severity.label,
                "host": f.host,
                "title": f.title,
                "evidence": f.evidence,
                "action": f.action,
                "conninfo": dict(f.conninfo),
                "pool": dict(f.pool),
            }
            for f in report.findings
        ],
        "idle_probe": None
        if idle is None
        else {
            "host": idle.host,
            "seconds": idle.seconds,
            "error": idle.error,
            "last_alive": idle.last_alive,
            "first_dead": idle.first_dead,
            "timeout": idle.middle,
            "keepalive_alive": idle.keepalive_alive,
            "checks": [vars_of(c) for c in idle.checks],
        },
        "recommendations": {"conninfo": conninfo, "pool": pool},
    }
    secrets = report.dsn.secrets
    escaped = tuple(json.dumps(secret)[1:-1] for secret in secrets)  # as JSON spells them
    return scrub(json.dumps(document, indent=2), (*secrets, *escaped))
