"""Checks of a connection pooler (PgBouncer) in the path. Pure: facts in, findings out.

The pooler is seen the way `ResilientPool` sees it: the backend pid the login reported
is not the pid the server gives for the session.
"""

from __future__ import annotations

from ._model import Finding, HostReport, PoolerFacts, Severity
from ._units import heartbeat_below, seconds_text

__all__ = ["assess_pooler", "pool_mode"]

_MODE_MEANS = {
    "transaction": (
        "transaction mode: each transaction may run on another server connection. "
        "ResilientPool copes (server-side prepared statements are off behind a pooler); "
        "session state does not last past a transaction: put settings in ALTER ROLE/DATABASE "
        "... SET rather than configure(), and LISTEN (ResilientConnection.listen), advisory "
        "locks and temporary tables need a direct connection"
    ),
    "session": (
        "session mode: each client connection holds a server connection, so the pools' "
        "max_size together count against PgBouncer's pool size"
    ),
}
_TIMEOUTS = {
    "server_idle_timeout": "server connections idle that long are closed by PgBouncer "
    "(clients do not notice)",
    "server_lifetime": "server connections are recycled after that long (clients do not notice)",
    "idle_transaction_timeout": "a client idle inside a transaction that long is disconnected",
    "query_wait_timeout": "a query waiting that long for a server connection ends its client",
}


def pool_mode(pooler: PoolerFacts) -> str | None:
    """``transaction``, ``session`` or ``statement``: from ``SHOW CONFIG``, else guessed
    from what two connections saw; None if unknown."""
    if pooler.config and pooler.config.get("pool_mode"):
        return pooler.config["pool_mode"]
    if pooler.transaction_error and "statement mode" in pooler.transaction_error:
        return "statement"
    if pooler.shared_backend is True:
        return "transaction"
    if pooler.shared_backend is False:
        return "session"
    return None


def _seconds(config: dict[str, str] | None, name: str) -> float | None:
    if config is None or name not in config:
        return None
    try:
        return float(config[name])
    except ValueError:
        return None


def assess_pooler(host: HostReport, heartbeat: float) -> list[Finding]:
    """What the pooler in front of *host* means for the pool."""
    pooler = host.pooler
    if pooler is None:
        return []
    label = host.label
    config = dict(pooler.config) if pooler.config is not None else None
    mode = pool_mode(pooler)
    source = "SHOW CONFIG" if config else "guessed from two connections"
    evidence = (
        f"the backend pid at login is {pooler.login_pid}, the server's is {pooler.server_pid}"
    )
    if config is None:
        evidence += (
            f"; PgBouncer's settings are unreadable as this user ({pooler.config_error}): "
            "check its client_idle_timeout yourself, or measure with --probe-idle"
        )
    findings = [
        Finding(
            "pooler.detected",
            Severity.INFO,
            "a connection pooler (PgBouncer) is in the path"
            + (f", {mode} mode ({source})" if mode else ""),
            evidence,
            _MODE_MEANS.get(mode or "", ""),
            host=label,
        )
    ]
    if mode == "statement":
        findings.append(
            Finding(
                "pooler.mode",
                Severity.PROBLEM,
                "the pooler is in statement mode: transactions of several statements are refused",
                pooler.transaction_error or "pool_mode = statement",
                "use pool_mode = transaction for this database: transaction(), "
                "run_transaction() and the in-doubt protocol need transactions",
                host=label,
            )
        )
    idle = _seconds(config, "client_idle_timeout")
    if idle:
        title = f"PgBouncer disconnects clients idle for {seconds_text(idle)} (client_idle_timeout)"
        if idle < 2 * heartbeat:
            beat = heartbeat_below(idle)
            findings.append(
                Finding(
                    "pooler.client_idle_timeout",
                    Severity.WARNING,
                    title,
                    f"client_idle_timeout = {idle:g}",
                    f"keep the pool's heartbeat well below it: heartbeat_interval={beat:g}",
                    host=label,
                    pool={"heartbeat_interval": beat},
                )
            )
        else:
            findings.append(
                Finding(
                    "pooler.client_idle_timeout",
                    Severity.INFO,
                    title,
                    f"client_idle_timeout = {idle:g}; the pool's heartbeat (every "
                    f"{heartbeat:g} s) keeps its connections from it",
                    host=label,
                )
            )
    timeouts = [
        f"{name} = {value:g} s: {meaning}"
        for name, meaning in _TIMEOUTS.items()
        if (value := _seconds(config, name))
    ]
    if timeouts:
        findings.append(
            Finding(
                "pooler.timeouts",
                Severity.INFO,
                "PgBouncer's timeouts",
                "; ".join(timeouts),
                host=label,
            )
        )
    return findings
