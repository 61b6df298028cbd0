"""Validation of the pool's settings, with messages that say what to fix."""

from __future__ import annotations

__all__ = ["validate"]


def validate(
    *,
    min_size: object,
    max_size: object,
    heartbeat_interval: float | None,
    max_lifetime: float | None,
    max_idle: float | None,
    heartbeat_timeout: float,
    acquire_timeout: float,
    max_connecting: object,
    probe_interval: float,
    in_doubt: str,
) -> None:
    """Raise `ValueError` naming the first setting out of range."""
    if not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
    if not isinstance(max_size, int) or max_size < 1 or max_size < min_size:
        raise ValueError(f"max_size must be an int >= max(1, min_size), got {max_size!r}")
    for label, value in (
        ("heartbeat_interval", heartbeat_interval),
        ("max_lifetime", max_lifetime),
        ("max_idle", max_idle),
    ):
        if value is not None and not value > 0:
            raise ValueError(f"{label} must be > 0 or None, got {value!r}")
    for label, value in (
        ("heartbeat_timeout", heartbeat_timeout),
        ("acquire_timeout", acquire_timeout),
    ):
        if not value > 0:
            raise ValueError(f"{label} must be > 0, got {value!r}")
    if not isinstance(max_connecting, int) or max_connecting < 1:
        raise ValueError(f"max_connecting must be an int >= 1, got {max_connecting!r}")
    if not probe_interval > 0:
        raise ValueError(f"probe_interval must be > 0, got {probe_interval!r}")
    if in_doubt not in ("resolve", "raise"):
        raise ValueError(f"in_doubt must be 'resolve' or 'raise', got {in_doubt!r}")
