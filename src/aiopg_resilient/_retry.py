"""Retry policy and backoff delays: pure logic, no I/O."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

__all__ = ["Backoff", "Jitter", "RetryPolicy", "fast_retries", "set_testing"]

Jitter = Literal["full", "equal", "decorrelated", "none"]
_JITTERS = ("full", "equal", "decorrelated", "none")

# Scale applied to every delay and timeout of every policy; 1.0 outside tests.
_scale: float = 1.0


def set_testing(testing: bool, *, scale: float = 0.01) -> None:
    """Shrink every retry delay and budget for a test suite, or restore them.

    ``set_testing(True)`` multiplies backoff delays and ``RetryPolicy.timeout`` of every
    policy by *scale* (default 1/100), so tests that exercise retries run fast without
    monkeypatching; ``set_testing(False)`` restores real delays. The
    ``aiopg_resilient.testing.fast_retries`` context manager does both around a block.
    """
    global _scale
    if testing and not (0.0 <= scale <= 1.0):
        raise ValueError(f"scale must be within [0, 1], got {scale!r}")
    _scale = scale if testing else 1.0


@contextmanager
def fast_retries(scale: float = 0.01) -> Iterator[None]:
    """Within the block, every retry delay and budget is multiplied by *scale*."""
    global _scale
    previous = _scale
    set_testing(True, scale=scale)
    try:
        yield
    finally:
        _scale = previous


def testing_scale() -> float:
    """The current delay scale (1.0 unless `set_testing` is on)."""
    return _scale


@dataclass(frozen=True)
class RetryPolicy:
    """How the layer retries: jittered exponential backoff within a total budget.

    Attempt *n* (0-based) sleeps ``min(max_delay, initial * multiplier**n)`` shaped by
    *jitter*: ``"full"`` draws uniformly from ``[0, d]`` (AWS' "full jitter", the default:
    clients never act in lockstep), ``"equal"`` from ``[d/2, d]``, ``"decorrelated"`` from
    ``[initial, previous * 3]`` capped at ``max_delay``, ``"none"`` uses ``d`` exactly.

    *timeout* bounds the whole operation, retries and sleeps included (seconds); once it
    is spent the caller gets `DatabaseUnavailable`. *max_attempts* (``None``: bounded by
    *timeout* only) caps the number of attempts. The policy is frozen and validated at
    construction, so a bad value fails where it is written.
    """

    initial: float = 0.05
    multiplier: float = 2.0
    max_delay: float = 2.0
    jitter: Jitter = "full"
    timeout: float = 30.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        for field in ("initial", "max_delay", "timeout"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"RetryPolicy.{field} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.multiplier, (int, float)) or not (
            math.isfinite(self.multiplier) and self.multiplier >= 1.0
        ):
            raise ValueError(f"RetryPolicy.multiplier must be >= 1, got {self.multiplier!r}")
        if self.max_delay < self.initial:
            raise ValueError(
                f"RetryPolicy.max_delay ({self.max_delay}) must be >= initial ({self.initial})"
            )
        if self.jitter not in _JITTERS:
            raise ValueError(f"RetryPolicy.jitter must be one of {_JITTERS}, got {self.jitter!r}")
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise ValueError(
                f"RetryPolicy.max_attempts must be None or an int >= 1, got {self.max_attempts!r}"
            )

    @property
    def budget(self) -> float:
        """The total time budget in seconds, shrunk under `set_testing`."""
        return self.timeout * _scale

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The infinite sequence of sleeps between attempts (scaled under `set_testing`)."""
        return iter(Backoff(self, rng))


class Backoff:
    """A stateful walk through a policy's delays; one per reconnect episode."""

    __slots__ = ("_attempt", "_policy", "_prev", "_rng")

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self._policy = policy
        self._rng = rng or random.Random()
        self._attempt = 0
        self._prev = policy.initial

    def __iter__(self) -> Iterator[float]:
        while True:
            yield self.next()

    def next(self) -> float:
        """Return the next delay in seconds."""
        p = self._policy
        if p.jitter == "decorrelated":
            upper = max(p.initial, self._prev * 3.0)
            delay = min(p.max_delay, self._rng.uniform(p.initial, upper))
            self._prev = delay
        else:
            # Cap the exponent so huge attempt counts neither overflow nor slow down.
            base = min(p.max_delay, p.initial * p.multiplier ** min(self._attempt, 64))
            if p.jitter == "full":
                delay = self._rng.uniform(0.0, base)
            elif p.jitter == "equal":
                delay = self._rng.uniform(base / 2.0, base)
            else:
                delay = base
        self._attempt += 1
        return delay * _scale
