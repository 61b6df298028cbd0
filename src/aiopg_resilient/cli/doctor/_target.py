"""The DSN under examination: its hosts, its effective settings, secret-free forms. Pure.

libpq settings can come from the DSN or from ``PG*`` environment variables; the doctor
reads both the way libpq does (the DSN wins), from a mapping passed in (``os.environ``
in the command, a dict in tests).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import make_conninfo

from ..._conninfo import describe, validate
from ._model import SSLMODES, Target

__all__ = ["DSN_SECRETS", "Dsn", "DsnError", "parse_dsn", "scrub"]

DSN_SECRETS = ("password", "sslpassword")
"""Conninfo keys whose values are never printed."""
MASK = "***"
_ENV = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "user": "PGUSER",
    "dbname": "PGDATABASE",
}
_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
_INTEGERS = (
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "connect_timeout",
)
_MIN_SECRET = 4
"""Shorter secrets are not scrubbed from free text (they would mangle it); they are never
put in it in the first place."""


class DsnError(ValueError):
    """The DSN cannot be used; the message says what to fix (exit status 2)."""


@dataclass(frozen=True)
class Dsn:
    """A parsed DSN: its parameters, hosts and effective settings."""

    params: Mapping[str, str]
    environ: Mapping[str, str]
    targets: tuple[Target, ...]

    def get(self, key: str, default: str | None = None) -> str | None:
        """The effective value of *key*: the DSN's, else its ``PG*`` variable's, else
        *default*."""
        value = self.params.get(key)
        if value:
            return value
        env = _ENV.get(key)
        if env is not None and self.environ.get(env):
            return self.environ[env]
        return default

    @property
    def sslmode(self) -> str:
        """The sslmode libpq uses (``prefer`` unless set)."""
        return self.get("sslmode", "prefer") or "prefer"

    @property
    def target_session_attrs(self) -> str:
        """The session role asked for (``any`` unless set)."""
        return self.get("target_session_attrs", "any") or "any"

    @property
    def label(self) -> str:
        """``user@host:port/dbname``, secret-free."""
        return describe(make_conninfo("", **self.params))

    @property
    def masked(self) -> str:
        """The DSN as key=value pairs, secrets replaced by ``***``."""
        shown = {k: (MASK if k in DSN_SECRETS else v) for k, v in self.params.items()}
        return make_conninfo("", **shown)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secret values, to scrub from any text that is printed."""
        values = [self.params.get(key) for key in DSN_SECRETS]
        values.extend(self.environ.get(env, "") for env in ("PGPASSWORD", "PGSSLPASSWORD"))
        return tuple(v for v in values if v and len(v) >= _MIN_SECRET)

    def for_target(self, target: Target, **overrides: str | None) -> str:
        """The conninfo of one host alone (no role selection: the doctor connects to
        each host to see what it is); *overrides* replace keys, None removes one."""
        params = dict(self.params)
        for key in ("target_session_attrs", "load_balance_hosts", "host", "hostaddr", "port"):
            params.pop(key, None)
        if target.host is not None:
            params["host"] = target.host
        if target.hostaddr is not None:
            params["hostaddr"] = target.hostaddr
        params["port"] = target.port
        for key, value in overrides.items():
            if value is None:
                params.pop(key, None)
            else:
                params[key] = value
        return make_conninfo("", **params)


def parse_dsn(dsn: str, environ: Mapping[str, str]) -> Dsn:
    """Parse and check *dsn*; raise `DsnError` saying what to fix."""
    try:
        params = validate(dsn)
    except psycopg.ProgrammingError as exc:
        raise DsnError(str(exc)) from None
    probe = Dsn(params, environ, ())
    sslmode = probe.sslmode
    if sslmode not in SSLMODES:
        raise DsnError(f"sslmode={sslmode!r} is not one of {', '.join(SSLMODES)}")
    attrs = probe.target_session_attrs
    if attrs not in _SESSION_ATTRS:
        raise DsnError(f"target_session_attrs={attrs!r} is not one of {', '.join(_SESSION_ATTRS)}")
    for key in _INTEGERS:
        value = params.get(key)
        if value is not None and not re.fullmatch(r"-?\d+", value.strip()):
            raise DsnError(f"{key}={value!r} must be an integer")
    return Dsn(params, environ, _targets(probe))


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in value.split(",")] if value else []


def _targets(dsn: Dsn) -> tuple[Target, ...]:
    hosts = _split(dsn.get("host"))
    addrs = _split(dsn.get("hostaddr"))
    ports = _split(dsn.get("port")) or ["5432"]
    if hosts and addrs and len(hosts) != len(addrs):
        raise DsnError(f"{len(hosts)} host names but {len(addrs)} hostaddr values: give one each")
    count = max(len(hosts), len(addrs), 1)
    if len(ports) == 1:
        ports = ports * count
    if len(ports) != count:
        raise DsnError(f"{len(ports)} ports for {count} hosts: give one port, or one per host")
    for port in ports:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise DsnError(f"port {port!r} is not a TCP port number (1-65535)")
    targets = []
    for i in range(count):
        host = hosts[i] if hosts and hosts[i] else None
        addr = addrs[i] if addrs and addrs[i] else None
        targets.append(Target(host, addr, ports[i]))
    return tuple(targets)


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """*text* with every secret value replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text
