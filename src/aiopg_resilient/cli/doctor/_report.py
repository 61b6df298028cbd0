"""The whole diagnosis: every check over the facts, the recommendations, the exit status.
Pure: `assess` takes what the probes found and the time."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ... import ResilientPool
from .. import EXIT_CANNOT_RUN, EXIT_OK, EXIT_PROBLEM
from ._assess_client import assess_client, pool_keepalives
from ._assess_pooler import assess_pooler
from ._assess_reach import assess_reach
from ._assess_roles import assess_roles
from ._assess_server import assess_server
from ._assess_tls import assess_tls
from ._idle_logic import assess_idle
from ._model import Finding, HostReport, IdleResult, Severity
from ._target import Dsn

__all__ = ["DEFAULT_HEARTBEAT", "Report", "assess", "recommend"]

DEFAULT_HEARTBEAT = float(inspect.signature(ResilientPool).parameters["heartbeat_interval"].default)
"""`ResilientPool`'s default ``heartbeat_interval``, which the checks take as given."""

Values = dict[str, "str | int | float"]


@dataclass(frozen=True)
class Report:
    """What the doctor found about one DSN."""

    dsn: Dsn
    hosts: tuple[HostReport, ...]
    findings: tuple[Finding, ...]
    idle: IdleResult | None = None

    @property
    def connected(self) -> bool:
        """Whether the doctor logged in to at least one host (by any sslmode)."""
        return any(host.facts is not None for host in self.hosts)

    @property
    def worst(self) -> Severity:
        """The worst severity found."""
        return max((f.severity for f in self.findings), default=Severity.OK)

    def count(self, severity: Severity) -> int:
        """How many findings have *severity*."""
        return sum(1 for f in self.findings if f.severity is severity)

    def exit_status(self, *, strict: bool = False) -> int:
        """3: no host could be logged in to; 1: a problem (or, with *strict*, a warning);
        else 0."""
        if not self.connected:
            return EXIT_CANNOT_RUN
        threshold = Severity.WARNING if strict else Severity.PROBLEM
        return EXIT_PROBLEM if self.worst >= threshold else EXIT_OK

    def recommendations(self) -> tuple[Values, Values]:
        """(conninfo parameters, ResilientPool arguments) the findings recommend."""
        return recommend(self.findings)


def _merge(into: Values, values: Mapping[str, str | int | float]) -> None:
    for key, value in values.items():
        current = into.get(key)
        if current is None:
            into[key] = value
        elif isinstance(current, (int, float)) and isinstance(value, (int, float)):
            into[key] = min(current, value)  # the stricter of two limits


def recommend(findings: Sequence[Finding]) -> tuple[Values, Values]:
    """Merge what the warnings and problems recommend (the smaller of two numbers)."""
    conninfo: Values = {}
    pool: Values = {}
    for finding in sorted(findings, key=lambda f: -f.severity):
        if finding.severity >= Severity.WARNING:
            _merge(conninfo, finding.conninfo)
            _merge(pool, finding.pool)
    return conninfo, pool


def assess(
    dsn: Dsn,
    hosts: Sequence[HostReport],
    idle: IdleResult | None,
    now: float,
    *,
    heartbeat: float = DEFAULT_HEARTBEAT,
) -> Report:
    """Every finding about *dsn*, from what the probes found at epoch *now*."""
    findings: list[Finding] = []
    for host in hosts:
        findings.extend(assess_reach(host))
        findings.extend(assess_tls(dsn, host, now))
        findings.extend(assess_server(host, heartbeat))
        findings.extend(assess_pooler(host, heartbeat))
    findings.extend(assess_roles(dsn, hosts))
    socket = next((h.facts.socket for h in hosts if h.facts and h.facts.socket), None)
    findings.extend(assess_client(dsn, socket))
    if idle is not None:
        keepalives = pool_keepalives(dsn)
        idle_keep = keepalives["keepalives_idle"] if keepalives["keepalives"] else 10**9
        findings.extend(assess_idle(idle, idle_keep, heartbeat))
    return Report(dsn, tuple(hosts), tuple(findings), idle)
