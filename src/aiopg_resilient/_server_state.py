"""What a pool knows of its server: reachable or not, the last error, how long to hold
off after a configuration error, and which incarnation of the server it is (the
identity the in-doubt protocol checks). One object per server, cleared on success."""

from __future__ import annotations

import copy
import random
import time

from ._commit import Identity
from ._errors import Failure, classify
from ._retry import Backoff, RetryPolicy

__all__ = ["FATAL_HOLD_FIRST", "FATAL_HOLD_MAX", "ServerState"]

# After a configuration error at login (bad password, no such role or database, pg_hba,
# SSL mismatch) nobody tries again for this long, doubling while it persists: a rotated
# password must neither hang requests nor lock the account with a storm of logins.
FATAL_HOLD_FIRST = 1.0
FATAL_HOLD_MAX = 30.0


def _too_many(exc: BaseException) -> bool:
    text = str(exc).lower()
    return getattr(exc, "sqlstate", None) == "53300" or "too many clients" in text


class ServerState:
    """Reachability of one server, as the pool's connection attempts find it."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.down = False
        """The last connection attempt failed (not a configuration error): probing."""
        self.last_error: BaseException | None = None
        self._fatal: BaseException | None = None
        self._fatal_streak = 0
        self._hold_until = 0.0
        self._backoff: Backoff | None = None
        self.suspect = False
        """A connection was just lost: the next connect is a single probe."""
        self.retry_at = 0.0
        """No connection attempt before this (monotonic): the backoff between failed
        attempts, kept across refill runs so callers arriving one by one cannot make
        every attempt the first of a new backoff."""
        self.wants_primary = False
        """A write reached a server in recovery: new connections ask for a read-write
        session (multi-host conninfo without ``target_session_attrs``; see `_role`)."""
        self.identity: Identity | None = None
        """The incarnation the latest connection found (system identifier, start time,
        crash mark). Each connection also keeps its own: the in-doubt protocol compares
        the one a transaction ran on with what the server is when it resolves."""

    def learnt(self, identity: Identity | None) -> bool:
        """Note the incarnation a new connection found; True if it differs from the
        one seen before (a restart, a crash, or another cluster behind the address)."""
        if identity is None:
            return False
        changed = self.identity is not None and identity != self.identity
        self.identity = identity
        return changed

    def reachable(self) -> bool:
        """Note a successful connect; True if the server was down until now."""
        was_down = self.down
        self.down = False
        self.last_error = None
        self._fatal = None
        self._fatal_streak = 0
        self._hold_until = 0.0
        self._backoff = None
        self.suspect = False
        self.retry_at = 0.0
        return was_down

    def next_delay(self, policy: RetryPolicy) -> float:
        """The next backoff delay after a failed attempt (reset by a success)."""
        if self._backoff is None:
            self._backoff = Backoff(policy, self._rng)
        return self._backoff.next()

    def failed(self, exc: BaseException) -> Failure:
        """Note a failed connect; returns what kind of failure it was."""
        self.last_error = exc
        kind = classify(exc)
        if kind is Failure.FATAL:
            self._fatal = exc
            self._fatal_streak += 1
            hold = min(FATAL_HOLD_MAX, FATAL_HOLD_FIRST * 2 ** (self._fatal_streak - 1))
            self._hold_until = time.monotonic() + hold * self._rng.uniform(0.8, 1.0)
        elif not _too_many(exc):
            # "Too many clients" while growing the pool: the server is up, just full.
            self.down = True
        return kind

    def held(self) -> BaseException | None:
        """While a configuration error holds connecting off: a copy of it for the caller
        (each caller its own exception object), else None."""
        if self._fatal is None or time.monotonic() >= self._hold_until:
            return None
        try:
            return copy.copy(self._fatal)
        except Exception:  # pragma: no cover - an exception that cannot be copied
            return self._fatal
