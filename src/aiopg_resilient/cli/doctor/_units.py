"""Small helpers shared by the checks: durations as text, a heartbeat below a limit."""

from __future__ import annotations

__all__ = ["heartbeat_below", "seconds_text"]


def seconds_text(value: float) -> str:
    """``0.5 s``, ``30 s``, ``5 min``, ``2 h``."""
    if value >= 7200 and value % 3600 == 0:
        return f"{value / 3600:g} h"
    if value >= 120 and value % 60 == 0:
        return f"{value / 60:g} min"
    return f"{value:g} s"


def heartbeat_below(limit: float) -> float:
    """A ``heartbeat_interval`` that touches every idle connection well before *limit*
    seconds of idleness (half of it; whole seconds from 2 s up)."""
    half = limit / 2
    return float(int(half)) if half >= 2 else round(max(half, 0.2), 1)
