"""Primary or standby: ``target_session_attrs`` against the roles found. Pure."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ._model import Finding, HostReport, ServerFacts, Severity
from ._target import Dsn

__all__ = ["assess_roles"]


def _primary(facts: ServerFacts) -> bool:
    return not facts.in_recovery


def _read_write(facts: ServerFacts) -> bool:
    return not facts.in_recovery and not facts.read_only


def _read_only(facts: ServerFacts) -> bool:
    return facts.in_recovery or facts.read_only


def _standby(facts: ServerFacts) -> bool:
    return facts.in_recovery


_WANTS: dict[str, tuple[str, Callable[[ServerFacts], bool]]] = {
    "read-write": ("a read-write server (a primary)", _read_write),
    "primary": ("a primary", _primary),
    "read-only": ("a read-only server", _read_only),
    "standby": ("a standby", _standby),
}


def assess_roles(dsn: Dsn, hosts: Sequence[HostReport]) -> list[Finding]:
    """``target_session_attrs`` against the roles found."""
    known = [(h, h.facts) for h in hosts if h.facts is not None]
    if not known:
        return []
    attrs = dsn.target_session_attrs
    evidence = "; ".join(
        f"{h.label}: {'standby' if f.in_recovery else 'primary'}"
        + (" (read-only)" if f.read_only and not f.in_recovery else "")
        for h, f in known
    )
    if attrs in _WANTS:
        wanted, fits = _WANTS[attrs]
        chosen = next((h for h, f in known if fits(f)), None)
        if chosen is None:
            where = "the server is not" if len(hosts) == 1 else "no host reached is"
            return [
                Finding(
                    "role.target",
                    Severity.PROBLEM,
                    f"{wanted} is wanted (target_session_attrs={attrs}) but {where} one",
                    evidence,
                    "point the DSN at the primary (list every node: host=a,b,c, libpq picks "
                    "the one that fits), or check whether a failover left no primary",
                )
            ]
        return [
            Finding(
                "role.target",
                Severity.OK,
                f"target_session_attrs={attrs}: libpq will use {chosen.label}",
                evidence,
            )
        ]
    standbys = [h for h, f in known if f.in_recovery]
    if attrs == "any" and standbys and len(standbys) < len(known):
        return [
            Finding(
                "role.target",
                Severity.WARNING,
                "the hosts include a standby and no target_session_attrs says which to use",
                evidence,
                "add target_session_attrs=read-write for the pool that writes "
                "(prefer-standby for a read pool)",
                conninfo={"target_session_attrs": "read-write"},
            )
        ]
    if attrs == "any" and standbys:
        return [
            Finding(
                "role.target",
                Severity.INFO,
                "the server is a standby: writes fail (25006 read-only transaction)",
                evidence,
            )
        ]
    if attrs == "prefer-standby" and not standbys:
        return [
            Finding(
                "role.target",
                Severity.INFO,
                "no standby answered: libpq falls back to the primary",
                evidence,
            )
        ]
    return []
