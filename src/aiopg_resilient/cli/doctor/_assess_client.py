"""The client's TCP settings in effect: keepalives and tcp_user_timeout, as the DSN sets
them, as `ResilientPool` completes them, as the kernel shows them. Pure."""

from __future__ import annotations

from ..._conninfo import CONNECTION_DEFAULTS
from ._model import Finding, Severity, SocketOptions
from ._target import Dsn

__all__ = ["assess_client", "pool_keepalives"]

KEYS = (
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
SLOW_DETECTION = 120
"""Seconds: a vanished peer noticed later than this is a warning."""


def pool_keepalives(dsn: Dsn) -> dict[str, int]:
    """The keepalive settings a `ResilientPool` uses with *dsn*: the DSN's, else the
    pool's defaults (`aiopg_resilient._conninfo.CONNECTION_DEFAULTS`)."""
    values = {}
    for key in KEYS:
        text = dsn.params.get(key) or CONNECTION_DEFAULTS[key]
        values[key] = int(text)
    return values


def _kernel(socket: SocketOptions | None) -> str:
    if socket is None:
        return ""
    if not socket.keepalive:
        return "; the socket has SO_KEEPALIVE off"
    return (
        f"; plain libpq with this DSN: the socket shows keepalive idle {socket.idle} s, "
        f"interval {socket.interval} s, {socket.count} probes, TCP_USER_TIMEOUT "
        f"{socket.user_timeout_ms} ms (0: the kernel's ~15 min of retransmissions)"
    )


def assess_client(dsn: Dsn, socket: SocketOptions | None) -> list[Finding]:
    """Findings about the client side of the TCP connections."""
    if all(target.is_socket for target in dsn.targets):
        return [
            Finding(
                "client.keepalives",
                Severity.INFO,
                "Unix-domain socket: TCP keepalives and tcp_user_timeout do not apply",
            )
        ]
    given = {key: dsn.params[key] for key in KEYS if key in dsn.params}
    used = pool_keepalives(dsn)
    filled = [key for key in KEYS if key not in given]
    evidence = "the DSN sets " + (", ".join(f"{k}={v}" for k, v in given.items()) or "none of them")
    if filled:
        evidence += "; ResilientPool fills in " + ", ".join(
            f"{k}={CONNECTION_DEFAULTS[k]}" for k in filled
        )
    evidence += _kernel(socket)
    findings = []
    if used["keepalives"] == 0:
        findings.append(
            Finding(
                "client.keepalives",
                Severity.WARNING,
                "TCP keepalives are off (keepalives=0)",
                evidence,
                "remove keepalives=0 (or set keepalives=1): an idle connection whose server "
                "or path vanished without a word stays 'open' for ever, and a NAT or load "
                "balancer drops idle connections sooner without keepalive traffic",
                conninfo={"keepalives": 1},
            )
        )
    else:
        detection = used["keepalives_idle"] + used["keepalives_interval"] * used["keepalives_count"]
        if detection > SLOW_DETECTION:
            findings.append(
                Finding(
                    "client.keepalives",
                    Severity.WARNING,
                    f"a vanished server is noticed only after {detection} s idle",
                    evidence,
                    "lower keepalives_idle (ResilientPool's default: 10 s, 3 probes 5 s apart)",
                    conninfo={
                        "keepalives_idle": 10,
                        "keepalives_interval": 5,
                        "keepalives_count": 3,
                    },
                )
            )
        else:
            findings.append(
                Finding(
                    "client.keepalives",
                    Severity.OK,
                    f"TCP keepalives on: a vanished server is noticed after ~{detection} s idle",
                    evidence,
                )
            )
    if used["tcp_user_timeout"] == 0:
        findings.append(
            Finding(
                "client.tcp_user_timeout",
                Severity.WARNING,
                "tcp_user_timeout=0: a query on a path that went silent hangs ~15 minutes",
                evidence,
                "remove tcp_user_timeout=0 (ResilientPool's default: 20000 ms)",
                conninfo={"tcp_user_timeout": 20000},
            )
        )
    return findings
