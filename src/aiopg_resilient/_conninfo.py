"""Connection strings: validation, resilience defaults, secret-free labels. Pure, no I/O."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["CONNECTION_DEFAULTS", "apply_defaults", "describe", "validate"]

# Applied unless the DSN, the connect kwargs or the matching PG* environment variable set
# them. Together with the heartbeat they bound how long a dead peer can go unnoticed:
# - keepalives: an idle connection whose peer vanished (no FIN: power loss, a NAT or load
#   balancer that dropped its state) is declared dead after 10 s idle + 3 probes 5 s
#   apart = 25 s, instead of the kernel default of over two hours;
# - tcp_user_timeout: data sent but not acknowledged for 20 s fails the connection,
#   instead of the ~15 minutes of kernel retransmissions a query would otherwise hang;
# - connect_timeout: a connect (per host) that gets no answer gives up after 5 s so the
#   retry loop can try again or report, instead of libpq's default of waiting forever.
CONNECTION_DEFAULTS: Mapping[str, str] = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",
    "connect_timeout": "5",
}
_ENVIRONMENT = {"connect_timeout": "PGCONNECT_TIMEOUT", "application_name": "PGAPPNAME"}


_QUOTED = re.compile(r'"([^"]*)"')


def validate(conninfo: str) -> dict[str, str]:
    """Parse *conninfo* or raise `psycopg.ProgrammingError` saying what to fix."""
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(conninfo).items()}
    except psycopg.ProgrammingError as exc:
        # libpq quotes the offending token, which may be (part of) a password.
        reason = _QUOTED.sub(lambda m: m[0] if m[1] == "=" else '"..."', str(exc).strip())
        raise psycopg.ProgrammingError(
            f"invalid connection string ({reason}); use libpq 'key=value' pairs, e.g. "
            "'host=db.example dbname=app user=app', or a URL such as "
            "'postgresql://app@db.example/app'"
        ) from None
    if _unencoded_userinfo(conninfo):
        # libpq ends a URL's user:password at its first '@' (or sees none before a '/'):
        # the rest of such a password would become the host, port or database name, in
        # every repr, log line and error. Nothing of it is quoted here.
        raise psycopg.ProgrammingError(
            "invalid connection string: the URL has a bare '@' or '/' in its user name, "
            "password or database name, and libpq would read part of it as the host, port "
            "or database (not shown: it may be the password). Percent-encode them ('@' is "
            "%40, '/' is %2F), or use key=value pairs ('host=... user=... password=...')"
        )
    return params


def _unencoded_userinfo(conninfo: str) -> bool:
    """A ``postgresql://`` URL whose user name or password holds a bare '@' or '/': its
    authority and path (before any '?') have two '@', or a '/' before the '@'."""
    match = re.match(r"\s*postgres(?:ql)?://([^?]*)", conninfo)
    if match is None or "@" not in match[1]:
        return False
    rest = match[1]
    return rest.count("@") > 1 or "/" in rest[: rest.rindex("@")]


def apply_defaults(
    conninfo: str, connect_kwargs: Mapping[str, Any] | None, *, application_name: str
) -> str:
    """Return *conninfo* with `CONNECTION_DEFAULTS` and an application_name filled in.

    Only keys set nowhere else are added: the DSN, *connect_kwargs* and the matching
    ``PG*`` environment variables always win.
    """
    given = validate(conninfo)
    kwargs = connect_kwargs or {}
    extra: dict[str, str] = {}
    defaults = {**CONNECTION_DEFAULTS, "application_name": application_name}
    for key, value in defaults.items():
        env = _ENVIRONMENT.get(key)
        if key in given or key in kwargs or (env is not None and os.environ.get(env)):
            continue
        extra[key] = value
    return make_conninfo(conninfo, **extra)


def describe(conninfo: str) -> str:
    """A short, secret-free label for logs: ``user@host:port/dbname``."""
    try:
        p = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "<invalid connection string>"
    host = p.get("host") or p.get("hostaddr") or os.environ.get("PGHOST") or "localhost"
    port = p.get("port") or os.environ.get("PGPORT") or "5432"
    user = p.get("user") or os.environ.get("PGUSER") or ""
    dbname = p.get("dbname") or os.environ.get("PGDATABASE") or ""
    prefix = f"{user}@" if user else ""
    return f"{prefix}{host}:{port}/{dbname}"
