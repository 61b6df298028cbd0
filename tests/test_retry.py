"""RetryPolicy and the backoff sequence: pure logic, no server, no event loop."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from aiopg_resilient import RetryPolicy, set_testing
from aiopg_resilient._retry import Backoff


def _take(policy: RetryPolicy, n: int, seed: int = 1) -> list[float]:
    return list(itertools.islice(policy.delays(random.Random(seed)), n))


def test_defaults_are_bounded() -> None:
    """The default policy has a finite total budget and a capped delay."""
    p = RetryPolicy()
    assert (p.initial, p.multiplier, p.max_delay, p.jitter, p.timeout, p.max_attempts) == (
        0.05,
        2.0,
        2.0,
        "full",
        30.0,
        None,
    )


def test_policy_is_frozen() -> None:
    """A policy is a value: it cannot be changed after construction."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        RetryPolicy().timeout = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": -1},
        {"initial": float("nan")},
        {"multiplier": 0.5},
        {"max_delay": 0.01, "initial": 0.1},
        {"jitter": "random"},
        {"timeout": float("inf")},
        {"max_attempts": 0},
        {"max_attempts": True},
    ],
)
def test_invalid_values_fail_at_construction(kwargs: dict[str, object]) -> None:
    """Every out-of-range value raises ValueError where the policy is written."""
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_no_jitter_is_exponential_and_capped() -> None:
    """Without jitter the delays double from `initial` and stop at `max_delay`."""
    p = RetryPolicy(initial=0.1, multiplier=2, max_delay=1.0, jitter="none")
    assert _take(p, 6) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_full_jitter_stays_within_the_exponential_envelope() -> None:
    """Full jitter draws each delay from [0, min(max_delay, initial * multiplier**n)]."""
    p = RetryPolicy(initial=0.1, max_delay=1.0)
    for seed in range(50):
        for n, d in enumerate(_take(p, 8, seed)):
            assert 0.0 <= d <= min(1.0, 0.1 * 2**n)


def test_full_jitter_spreads_clients() -> None:
    """Two clients with different random streams do not retry in lockstep."""
    p = RetryPolicy()
    assert _take(p, 5, seed=1) != _take(p, 5, seed=2)


def test_equal_jitter_keeps_at_least_half() -> None:
    """Equal jitter draws from [d/2, d]."""
    p = RetryPolicy(initial=0.1, max_delay=1.0, jitter="equal")
    for n, d in enumerate(_take(p, 8, seed=3)):
        cap = min(1.0, 0.1 * 2**n)
        assert cap / 2 <= d <= cap


def test_decorrelated_jitter_is_bounded() -> None:
    """Decorrelated jitter stays within [initial, max_delay]."""
    p = RetryPolicy(initial=0.05, max_delay=0.5, jitter="decorrelated")
    delays = _take(p, 200, seed=4)
    assert all(0.05 <= d <= 0.5 for d in delays)
    assert max(delays) > 0.25  # it does grow


def test_huge_attempt_counts_do_not_overflow() -> None:
    """A backoff walked for a very long time keeps returning max_delay."""
    b = Backoff(RetryPolicy(jitter="none", max_delay=2.0))
    for _ in range(5000):
        d = b.next()
    assert d == 2.0


def test_set_testing_shrinks_and_restores() -> None:
    """set_testing scales delays and the budget, and set_testing(False) restores them."""
    p = RetryPolicy(initial=1.0, max_delay=1.0, jitter="none", timeout=10.0)
    try:
        set_testing(True, scale=0.01)
        assert _take(p, 1) == [pytest.approx(0.01)]
        assert p.budget == pytest.approx(0.1)
    finally:
        set_testing(False)
    assert _take(p, 1) == [1.0]
    assert p.budget == 10.0
    with pytest.raises(ValueError, match="scale"):
        set_testing(True, scale=2.0)


def test_fast_retries_context_restores() -> None:
    """testing.fast_retries() shrinks delays inside the block only, even on error."""
    from aiopg_resilient.testing import fast_retries

    p = RetryPolicy(timeout=10.0)
    with pytest.raises(RuntimeError), fast_retries(scale=0.5):
        assert p.budget == 5.0
        raise RuntimeError
    assert p.budget == 10.0


def test_fast_retries_fixture(fast_retries: None) -> None:
    """The pytest plugin's fast_retries fixture shrinks delays for the test."""
    assert RetryPolicy(timeout=10.0).budget == pytest.approx(0.1)
