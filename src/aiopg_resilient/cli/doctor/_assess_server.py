"""Checks of a server: the settings that cut or keep connections, how full it is, its
role. Pure: facts in, findings out."""

from __future__ import annotations

from ._model import Finding, HostReport, ServerFacts, Severity
from ._units import heartbeat_below, seconds_text

__all__ = ["assess_server"]

_SOURCES = {
    "default": "the default",
    "configuration file": "postgresql.conf",
    "user": "ALTER ROLE ... SET",
    "database": "ALTER DATABASE ... SET",
    "database user": "ALTER ROLE ... IN DATABASE ... SET",
    "session": "this session",
    "client": "the client",
}


def assess_server(host: HostReport, heartbeat: float) -> list[Finding]:
    """The server settings and load findings of *host* (which has facts)."""
    facts = host.facts
    if facts is None:
        return []
    label = host.label
    findings = [
        _role(facts, label),
        _connections(facts, label),
        _idle_session(facts, label, heartbeat),
        *_transaction_limits(facts, label),
        _keepalives(facts, label),
        _check_interval(facts, label),
    ]
    return [f for f in findings if f is not None]


def _seconds(facts: ServerFacts, name: str) -> float | None:
    setting = facts.settings.get(name)
    return None if setting is None else setting.seconds()


def _source(facts: ServerFacts, name: str) -> str:
    setting = facts.settings.get(name)
    source = setting.source if setting is not None else None
    return _SOURCES.get(source or "", source or "unknown")


def _role(facts: ServerFacts, label: str) -> Finding:
    if facts.in_recovery:
        title = "a standby (hot standby, read-only)"
    elif facts.read_only:
        title = "a primary, read-only by default (default_transaction_read_only = on)"
    else:
        title = "a primary (read-write)"
    return Finding("server.role", Severity.INFO, f"PostgreSQL {facts.version}, {title}", host=label)


def _connections(facts: ServerFacts, label: str) -> Finding | None:
    def number(name: str) -> int:
        setting = facts.settings.get(name)
        value = setting.number() if setting is not None else None
        return int(value or 0)

    most = number("max_connections")
    if most <= 0:
        return None
    reserved = number("superuser_reserved_connections") + number("reserved_connections")
    usable = max(most - reserved, 1)
    used = facts.others + 1
    free = usable - used
    evidence = (
        f"{used} client connections (this one included) of max_connections = {most}, "
        f"{reserved} reserved for superusers: {max(free, 0)} left for other roles"
    )
    if facts.superuser:
        evidence += " (this login is a superuser: it may use the reserved ones too)"
    action = (
        "raise max_connections (a restart), lower the max_size of the pools using it "
        "(together they must stay below it), or put PgBouncer in front"
    )
    if free <= max(1, usable // 10):
        return Finding(
            "server.connections",
            Severity.PROBLEM,
            f"the server is nearly out of connections ({max(free, 0)} of {usable} free)",
            evidence,
            action,
            host=label,
        )
    if used * 4 >= usable * 3:
        return Finding(
            "server.connections",
            Severity.WARNING,
            f"the server's connections are {used * 100 // usable}% used",
            evidence,
            action,
            host=label,
        )
    return Finding(
        "server.connections",
        Severity.OK,
        f"{used} of {usable} connections in use",
        evidence,
        host=label,
    )


def _idle_session(facts: ServerFacts, label: str, heartbeat: float) -> Finding | None:
    limit = _seconds(facts, "idle_session_timeout")
    if limit is None:
        return None
    if limit <= 0:
        return Finding(
            "server.idle_session_timeout", Severity.OK, "idle_session_timeout is off", host=label
        )
    source = _source(facts, "idle_session_timeout")
    evidence = f"idle_session_timeout = {seconds_text(limit)} (from {source})"
    title = f"the server ends sessions idle for {seconds_text(limit)} (idle_session_timeout)"
    if limit < 2 * heartbeat:
        beat = heartbeat_below(limit)
        return Finding(
            "server.idle_session_timeout",
            Severity.WARNING,
            title,
            evidence,
            f"keep the pool's heartbeat well below it (heartbeat_interval={beat:g}), or turn it "
            "off for the application's role: ALTER ROLE ... SET idle_session_timeout = 0",
            host=label,
            pool={"heartbeat_interval": beat},
        )
    return Finding(
        "server.idle_session_timeout",
        Severity.INFO,
        title,
        f"{evidence}; the pool's heartbeat (every {heartbeat:g} s) keeps its own connections "
        "from it, other clients idle that long are cut (57P05)",
        host=label,
    )


def _transaction_limits(facts: ServerFacts, label: str) -> list[Finding]:
    findings = []
    idle_tx = _seconds(facts, "idle_in_transaction_session_timeout")
    if idle_tx == 0:
        findings.append(
            Finding(
                "server.idle_in_transaction_session_timeout",
                Severity.INFO,
                "idle_in_transaction_session_timeout is off",
                "a client that vanishes inside a transaction keeps its locks until TCP notices",
                "consider idle_in_transaction_session_timeout = '60s' (longer than any "
                "pause inside your transactions)",
                host=label,
            )
        )
    for name, floor in (
        ("idle_in_transaction_session_timeout", 5.0),
        ("transaction_timeout", 5.0),
        ("statement_timeout", 1.0),
    ):
        value = _seconds(facts, name)
        if not value:
            continue
        severity = Severity.WARNING if value < floor else Severity.INFO
        what = {
            "idle_in_transaction_session_timeout": "a transaction idle that long is ended "
            "with its session (25P03): the block raises ConnectionLost",
            "transaction_timeout": "a transaction running that long is ended with its session",
            "statement_timeout": "a statement running that long is cancelled (57014, a "
            "statement error: not retried)",
        }[name]
        findings.append(
            Finding(
                f"server.{name}",
                severity,
                f"{name} = {seconds_text(value)}",
                f"{what}; from {_source(facts, name)}",
                "raise it above your longest legitimate case"
                if severity is Severity.WARNING
                else "",
                host=label,
            )
        )
    return findings


def _keepalives(facts: ServerFacts, label: str) -> Finding | None:
    idle = _seconds(facts, "tcp_keepalives_idle")
    interval = _seconds(facts, "tcp_keepalives_interval")
    count = facts.settings.get("tcp_keepalives_count")
    user = _seconds(facts, "tcp_user_timeout")
    if not idle or not interval or count is None:
        return None  # a Unix socket: no TCP options
    probes = int(count.number() or 0)
    evidence = (
        f"tcp_keepalives_idle = {seconds_text(idle)}, tcp_keepalives_interval = "
        f"{seconds_text(interval)}, tcp_keepalives_count = {probes}, tcp_user_timeout = "
        f"{seconds_text(user or 0)} (0: the kernel's)"
    )
    if idle + interval * probes > 300:
        return Finding(
            "server.keepalives",
            Severity.INFO,
            "the server notices a vanished client only after "
            f"{seconds_text(idle + interval * probes)}",
            evidence,
            "server side of the same story: tcp_keepalives_idle = 10, tcp_keepalives_interval "
            "= 5, tcp_keepalives_count = 3 free the backends (and locks) of clients that vanished",
            host=label,
        )
    return Finding(
        "server.keepalives", Severity.OK, "server-side TCP keepalives", evidence, host=label
    )


def _check_interval(facts: ServerFacts, label: str) -> Finding | None:
    value = _seconds(facts, "client_connection_check_interval")
    if value is None:
        return None
    if value == 0:
        return Finding(
            "server.client_connection_check_interval",
            Severity.INFO,
            "client_connection_check_interval is off",
            "a query whose client vanished runs on to its end",
            "client_connection_check_interval = '5s' stops it (PostgreSQL 14+)",
            host=label,
        )
    return Finding(
        "server.client_connection_check_interval",
        Severity.OK,
        f"client_connection_check_interval = {seconds_text(value)}",
        host=label,
    )
