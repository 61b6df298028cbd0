"""What the doctor finds: findings with a severity, and the facts they are drawn from.

Plain frozen dataclasses, no I/O: the probes (`._net`, `._probe`, `._idle`) fill the facts,
the checks (`._assess_*`) turn facts into `Finding` values, `._render` prints them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "SSLMODES",
    "CertInfo",
    "Finding",
    "HostReport",
    "IdleCheck",
    "IdleResult",
    "LadderStep",
    "PoolerFacts",
    "ServerFacts",
    "Setting",
    "Severity",
    "SocketOptions",
    "Target",
    "TlsProbe",
]

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
"""libpq's sslmodes, weakest first: the ladder the doctor climbs."""

Recommendation = Mapping[str, "str | int | float"]


class Severity(enum.IntEnum):
    """How bad a finding is; ordered, so ``max()`` gives the worst."""

    OK = 0
    INFO = 1
    WARNING = 2
    PROBLEM = 3

    @property
    def label(self) -> str:
        """The lower-case name used in the text and JSON output."""
        return self.name.lower()


@dataclass(frozen=True)
class Finding:
    """One check's outcome. ``code`` names the check (stable: scripts match on it), the
    severity says how it came out, ``title`` says it in a line, ``evidence`` what was seen,
    ``action`` what to do. ``conninfo`` and ``pool`` are the settings it recommends
    (conninfo parameters; `ResilientPool` keyword arguments)."""

    code: str
    severity: Severity
    title: str
    evidence: str = ""
    action: str = ""
    host: str | None = None
    conninfo: Recommendation = field(default_factory=dict)
    pool: Recommendation = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One host of the DSN, as libpq would try it."""

    host: str | None
    """Name, IP address or Unix socket directory; None: libpq's default."""
    hostaddr: str | None
    port: str

    @property
    def is_socket(self) -> bool:
        """A Unix-domain socket (no TCP, no TLS)."""
        return self.hostaddr is None and (self.host is None or self.host.startswith(("/", "@")))

    @property
    def label(self) -> str:
        """``host:port`` (``hostaddr`` in brackets when given)."""
        name = self.host or "(default socket)"
        if self.hostaddr:
            name = f"{name}[{self.hostaddr}]" if self.host else self.hostaddr
        return f"{name}:{self.port}"

    @property
    def address(self) -> str | None:
        """Where a TCP connection goes: ``hostaddr`` or ``host``; None for a socket."""
        if self.is_socket:
            return None
        return self.hostaddr or self.host


@dataclass(frozen=True)
class CertInfo:
    """The parts of the server certificate the doctor looks at."""

    subject: str
    issuer: str
    not_before: float
    """Epoch seconds."""
    not_after: float
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    common_name: str | None = None


@dataclass(frozen=True)
class TlsProbe:
    """The server's answer to a bare SSLRequest, and what its certificate says."""

    offered: bool | None
    """True: 'S', TLS offered; False: 'N', no TLS; None: no usable answer (see error)."""
    error: str | None = None
    protocol: str | None = None
    cipher: str | None = None
    cert: CertInfo | None = None
    chain_ok: bool | None = None
    """Whether the certificate verifies against `trust` (None: not checked)."""
    chain_error: str | None = None
    hostname_ok: bool | None = None
    hostname_error: str | None = None
    trust: str = ""
    """Where the trusted CAs came from: ``sslrootcert=...`` or ``the system store``."""


@dataclass(frozen=True)
class LadderStep:
    """A login with one sslmode."""

    sslmode: str
    connected: bool
    encrypted: bool | None = None
    error: str | None = None
    ms: float | None = None
    verified: str = ""
    """What libpq checked: ``certificate and host name``, ``certificate`` (verify-ca, or
    a weaker mode with a root certificate file, which libpq then checks), or ""."""


@dataclass(frozen=True)
class SocketOptions:
    """TCP options of a live connection's socket, as the kernel has them."""

    keepalive: bool
    idle: int | None = None
    interval: int | None = None
    count: int | None = None
    user_timeout_ms: int | None = None


@dataclass(frozen=True)
class Setting:
    """A server setting: its value in base units, the unit, where it was set."""

    value: str
    unit: str | None = None
    source: str | None = None

    def seconds(self) -> float | None:
        """The value in seconds for time settings (ms, s, min), else None."""
        scale = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
        if self.unit not in scale:
            return None
        try:
            return float(self.value) * scale[self.unit]
        except ValueError:
            return None

    def number(self) -> float | None:
        """The value as a number, or None."""
        try:
            return float(self.value)
        except ValueError:
            return None


@dataclass(frozen=True)
class ServerFacts:
    """What a logged-in connection learns about the server."""

    version: str
    in_recovery: bool
    read_only: bool
    settings: Mapping[str, Setting]
    others: int
    """Client backends on the server, not counting the doctor's own."""
    superuser: bool
    server_pid: int
    login_pid: int
    sslmode: str
    """The sslmode of the connection these facts came from."""
    encrypted: bool
    socket: SocketOptions | None = None


@dataclass(frozen=True)
class PoolerFacts:
    """A connection pooler (PgBouncer) seen between the client and the server."""

    server_pid: int
    login_pid: int
    shared_backend: bool | None = None
    """Two clients got the same server connection in turn (transaction/statement mode)."""
    config: Mapping[str, str] | None = None
    """PgBouncer's ``SHOW CONFIG``, when this user may read it."""
    config_error: str | None = None
    transaction_error: str | None = None
    """The error of a two-statement transaction (statement mode refuses it)."""


@dataclass(frozen=True)
class HostReport:
    """Everything learnt about one host."""

    target: Target
    addresses: tuple[str, ...] = ()
    dns_error: str | None = None
    tcp_ms: float | None = None
    tcp_error: str | None = None
    tls: TlsProbe | None = None
    login_ms: float | None = None
    login_error: str | None = None
    login_sqlstate: str | None = None
    ladder: tuple[LadderStep, ...] = ()
    facts: ServerFacts | None = None
    pooler: PoolerFacts | None = None

    @property
    def label(self) -> str:
        """The host's ``host:port`` label."""
        return self.target.label


@dataclass(frozen=True)
class IdleCheck:
    """One idle-probe connection, checked once after being idle ``idle`` seconds."""

    planned: float
    idle: float
    alive: bool
    reason: str | None = None


@dataclass(frozen=True)
class IdleResult:
    """The outcome of ``--probe-idle``."""

    host: str
    seconds: float
    checks: tuple[IdleCheck, ...]
    last_alive: float | None
    first_dead: float | None
    keepalive_alive: bool | None = None
    """A connection with TCP keepalives every second, checked after `first_dead`."""
    keepalive_idle: float | None = None
    error: str | None = None

    @property
    def middle(self) -> float | None:
        """The middle of the bracket [last alive, first dead]: the measured timeout."""
        if self.first_dead is None:
            return None
        return ((self.last_alive or 0.0) + self.first_dead) / 2
