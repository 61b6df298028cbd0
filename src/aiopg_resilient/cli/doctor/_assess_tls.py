"""TLS checks: does the server offer TLS, what each sslmode gives, the certificate's
expiry, chain and host name. Pure: facts in, findings out."""

from __future__ import annotations

import time

from ._model import SSLMODES, Finding, HostReport, LadderStep, Severity, TlsProbe
from ._target import Dsn

__all__ = ["assess_tls", "describe_step"]

EXPIRY_WARNING_DAYS = 30
_VERIFYING = ("verify-ca", "verify-full")
_DAY = 86400.0


def describe_step(step: LadderStep) -> str:
    """What one sslmode gives, in a few words."""
    if not step.connected:
        return f"fails ({step.error})"
    if not step.encrypted:
        return "connects, NOT encrypted"
    if step.verified:
        return f"encrypted, {step.verified} verified"
    return "encrypted, server not verified"


def _date(epoch: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def assess_tls(dsn: Dsn, host: HostReport, now: float) -> list[Finding]:
    """The TLS findings for *host*."""
    tls = host.tls
    if host.target.is_socket or tls is None or tls.offered is None:
        return []  # no TLS over a Unix socket; an unanswered probe is a reachability matter
    label = host.label
    findings = [_server(dsn, host, tls)]
    if tls.offered:
        findings.extend(_certificate(dsn, label, tls, now))
    findings.extend(_ladder(dsn, host))
    return findings


def _server(dsn: Dsn, host: HostReport, tls: TlsProbe) -> Finding:
    label = host.label
    if tls.offered:
        what = ", ".join(x for x in (tls.protocol, tls.cipher) if x) or "TLS"
        return Finding("tls.server", Severity.OK, f"the server offers TLS ({what})", host=label)
    evidence = "the server answered 'N' to PostgreSQL's SSLRequest"
    facts = host.facts
    if facts is not None and "ssl" in facts.settings:
        evidence += f"; SHOW ssl = {facts.settings['ssl'].value}"
    if host.pooler is not None:
        evidence += " (a pooler is in the path: that is its client side)"
        action = (
            "give PgBouncer a certificate (client_tls_sslmode = require, client_tls_cert_file, "
            "client_tls_key_file), then connect with sslmode=verify-full"
        )
    else:
        action = (
            "turn TLS on on the server: ssl = on with ssl_cert_file and ssl_key_file in "
            "postgresql.conf, then SELECT pg_reload_conf(); connect with sslmode=verify-full"
        )
    if dsn.sslmode in ("require", *_VERIFYING):
        return Finding(
            "tls.server",
            Severity.PROBLEM,
            f"the server does not offer TLS, and sslmode={dsn.sslmode} requires it: "
            "every connection fails",
            evidence,
            action,
            host=label,
        )
    return Finding(
        "tls.server",
        Severity.WARNING,
        "the server does not offer TLS: connections, queries and results travel in clear",
        evidence,
        action,
        host=label,
    )


def _certificate(dsn: Dsn, label: str, tls: TlsProbe, now: float) -> list[Finding]:
    findings = []
    if tls.error:
        findings.append(
            Finding(
                "cert.read", Severity.WARNING, "the TLS handshake failed", tls.error, host=label
            )
        )
    findings.append(_expiry(label, tls, now))
    chain = _chain(dsn, label, tls)
    if chain is not None:
        findings.append(chain)
    if tls.hostname_ok is not None:
        findings.append(_hostname(dsn, label, tls))
    return findings


def _expiry(label: str, tls: TlsProbe, now: float) -> Finding:
    cert = tls.cert
    renew = (
        "renew the server certificate (ssl_cert_file, ssl_key_file), then "
        "SELECT pg_reload_conf(): clients verifying it (verify-ca, verify-full) cannot "
        "connect meanwhile"
    )
    if cert is None:
        message = tls.chain_error or ""
        if "expired" in message:
            return Finding(
                "cert.expiry",
                Severity.PROBLEM,
                "the server certificate has expired",
                f"verification says: {message}",
                renew,
                host=label,
            )
        return Finding(
            "cert.expiry",
            Severity.INFO,
            "the certificate's dates could not be read",
            "install the 'cryptography' package to read certificates that do not verify",
            host=label,
        )
    days = (cert.not_after - now) / _DAY
    evidence = (
        f"valid from {_date(cert.not_before)} to {_date(cert.not_after)}; subject {cert.subject}; "
        f"issuer {cert.issuer}"
    )
    if cert.not_before > now:
        return Finding(
            "cert.expiry",
            Severity.PROBLEM,
            f"the server certificate is not valid yet (from {_date(cert.not_before)})",
            evidence,
            "check the clocks, or install a certificate valid now",
            host=label,
        )
    if days < 0:
        return Finding(
            "cert.expiry",
            Severity.PROBLEM,
            f"the server certificate has expired ({-days:.0f} days ago, {_date(cert.not_after)})",
            evidence,
            renew,
            host=label,
        )
    if days < EXPIRY_WARNING_DAYS:
        return Finding(
            "cert.expiry",
            Severity.WARNING,
            f"the server certificate expires in {days:.0f} days ({_date(cert.not_after)})",
            evidence,
            renew,
            host=label,
        )
    return Finding(
        "cert.expiry",
        Severity.OK,
        f"the server certificate is valid for {days:.0f} more days",
        evidence,
        host=label,
    )


def _chain(dsn: Dsn, label: str, tls: TlsProbe) -> Finding | None:
    if tls.chain_ok:
        return Finding(
            "cert.chain", Severity.OK, f"the certificate verifies against {tls.trust}", host=label
        )
    message = tls.chain_error or ""
    if tls.chain_ok is None:
        if not message:
            return None
        return Finding(
            "cert.chain",
            Severity.INFO,
            "the certificate chain was not checked",
            message,
            host=label,
        )
    if "expired" in message or "not yet valid" in message:
        return Finding(
            "cert.chain",
            Severity.INFO,
            "the chain was not checked past the certificate's dates",
            f"verification against {tls.trust} stops at: {message}",
            host=label,
        )
    issuer = f" (issuer: {tls.cert.issuer})" if tls.cert is not None else ""
    severity = Severity.PROBLEM if dsn.sslmode in _VERIFYING else Severity.WARNING
    return Finding(
        "cert.chain",
        severity,
        f"the server certificate does not verify against {tls.trust}",
        f"verification says: {message}",
        f"point sslrootcert at the CA that signed it{issuer}, or sslrootcert=system for a "
        "certificate from a public CA; until then verify-ca and verify-full fail",
        host=label,
    )


def _hostname(dsn: Dsn, label: str, tls: TlsProbe) -> Finding:
    if tls.hostname_ok:
        return Finding(
            "cert.hostname",
            Severity.OK,
            "the certificate is valid for the host name connected to",
            host=label,
        )
    severity = Severity.PROBLEM if dsn.sslmode == "verify-full" else Severity.WARNING
    return Finding(
        "cert.hostname",
        severity,
        "the server certificate is for another host",
        tls.hostname_error or "",
        "reissue it with the name clients connect to in subjectAltName (DNS:name or "
        "IP:address), or connect with a name it has; until then verify-full fails",
        host=label,
    )


def _ladder(dsn: Dsn, host: HostReport) -> list[Finding]:
    steps = {step.sslmode: step for step in host.ladder}
    if not steps:
        return []
    label = host.label
    table = "\n".join(f"{s.sslmode:<11} {describe_step(s)}" for s in host.ladder)
    findings = [Finding("tls.ladder", Severity.INFO, "what each sslmode gives", table, host=label)]
    own = steps.get(dsn.sslmode)
    if own is None:
        return findings
    working = [mode for mode in SSLMODES if steps.get(mode) and steps[mode].connected]
    full = steps.get("verify-full")
    full_works = full is not None and full.connected
    if not own.connected:
        if working:
            best = steps[working[-1]]
            findings.append(
                Finding(
                    "tls.sslmode",
                    Severity.PROBLEM,
                    f"sslmode={dsn.sslmode} cannot log in (sslmode={best.sslmode} can: "
                    f"{describe_step(best)})",
                    own.error or "",
                    "see the tls.server and cert.* findings for why; until it is fixed, "
                    f"sslmode={best.sslmode} logs in with what it gives",
                    host=label,
                )
            )
        return findings
    if not any(s.encrypted for s in host.ladder if s.connected):
        return findings  # no TLS at all: tls.server says it
    if not own.encrypted:
        mode = "verify-full" if full_works else "require"
        findings.append(
            Finding(
                "tls.sslmode",
                Severity.WARNING,
                f"sslmode={dsn.sslmode} connects without encryption though the server offers TLS",
                describe_step(own),
                f"use sslmode={mode}",
                host=label,
                conninfo={"sslmode": mode},
            )
        )
    elif dsn.sslmode in ("allow", "prefer", "require") and full_works:
        unchecked = "the host name" if own.verified else "who answers"
        findings.append(
            Finding(
                "tls.sslmode",
                Severity.WARNING,
                f"sslmode={dsn.sslmode} encrypts but does not check {unchecked} "
                "(verify-full works here)",
                describe_step(own),
                "use sslmode=verify-full: a man in the middle is refused",
                host=label,
                conninfo={"sslmode": "verify-full"},
            )
        )
    else:
        findings.append(
            Finding(
                "tls.sslmode",
                Severity.OK if dsn.sslmode in _VERIFYING else Severity.INFO,
                f"sslmode={dsn.sslmode}: {describe_step(own)}",
                host=label,
            )
        )
    return findings
