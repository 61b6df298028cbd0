"""The connection-source interface the operations run over, and its slot.

`Operations` (reads, writes, blocks) knows nothing of the pool but this: acquire a
connection within a deadline, give it back (clean), drop it (state unknown), report it
lost (dead: the source then checks the others), and run one query of the layer's own on
another connection (the in-doubt resolution's probes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ._driver import DriverConnection

__all__ = ["ConnectionSource", "Slot"]


@dataclass(eq=False)
class Slot:
    """A pooled connection and its bookkeeping."""

    conn: DriverConnection
    created: float
    expires: float | None
    last_used: float
    next_check: float = 0.0


class ConnectionSource(Protocol):
    """Where the operations get their connections from (a `ResilientPool`)."""

    async def _acquire(self, deadline: float) -> Slot: ...

    async def _release(self, slot: Slot) -> None: ...

    async def _discard(self, slot: Slot) -> None: ...

    async def _lost(self, slot: Slot, exc: BaseException | None) -> None: ...

    async def _side_query(self, query: str, params: dict[str, Any]) -> Any: ...
