"""The attempts of one operation within its retry budget: pure bookkeeping plus sleeps."""

from __future__ import annotations

import random
import time

import anyio

from ._errors import DatabaseUnavailable
from ._retry import Backoff, RetryPolicy

__all__ = ["Attempts"]


class Attempts:
    """Counts the attempts of one operation and sleeps between them within its budget."""

    __slots__ = ("_backoff", "_policy", "_rng", "count", "deadline")

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng
        self._backoff: Backoff | None = None
        self.deadline = time.monotonic() + policy.budget
        self.count = 0

    async def again(self, exc: BaseException, *, immediate_first: bool = True) -> None:
        """Sleep before the next attempt, or raise DatabaseUnavailable if none is left."""
        limit = self._policy.max_attempts
        if time.monotonic() >= self.deadline or (limit is not None and self.count >= limit):
            raise DatabaseUnavailable(
                f"gave up after {self.count} attempts: {exc}",
                attempts=self.count,
                last_error=exc,
            ) from exc
        if self.count == 1 and immediate_first:
            return  # a stale connection is the usual cause: retry at once
        self._backoff = self._backoff or Backoff(self._policy, self._rng)
        await anyio.sleep(min(self._backoff.next(), max(self.deadline - time.monotonic(), 0)))
