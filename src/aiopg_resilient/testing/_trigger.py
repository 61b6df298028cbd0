"""A fault a `ChaosProxy` carries out when a client sends a given message.

`ChaosProxy.on_client_message` arms a `Trigger`; the session that sees the pattern carries out
its action (`._session`) and records where it fired.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Literal

import anyio

if TYPE_CHECKING:
    from ._proxy import ChaosProxy

TriggerAction = Literal["cut_before", "cut_after", "freeze_before", "freeze_after"]
_TRIGGER_ACTIONS: frozenset[str] = frozenset(
    ("cut_before", "cut_after", "freeze_before", "freeze_after")
)


class Trigger:
    """A fault armed by `ChaosProxy.on_client_message`.

    `fired` (a `threading.Event`) is set when the action happens: for the cut actions just
    before the sockets close, so a client that has seen the cut finds it set; for the freeze
    actions once the connection is frozen. `connection_ids` lists where it fired.
    """

    def __init__(
        self, proxy: ChaosProxy, pattern: bytes, action: TriggerAction, *, once: bool
    ) -> None:
        self.pattern = pattern
        self.action: TriggerAction = action
        self.once = once
        self.fired = threading.Event()
        self.connection_ids: list[int] = []
        self._proxy = proxy

    @property
    def count(self) -> int:
        """How many times the trigger has fired."""
        return len(self.connection_ids)

    def remove(self) -> None:
        """Disarm the trigger; a no-op if it already fired once or the proxy is closed."""
        self._proxy._remove_trigger(self)

    async def wait(self, timeout: float = 10.0) -> None:
        """Wait, without blocking the caller's event loop, until the trigger has fired.

        Raises `TimeoutError` if it has not fired within `timeout` seconds.
        """
        with anyio.fail_after(timeout):
            # The proxy thread sets a threading.Event: no event of this loop to await.
            while not self.fired.is_set():  # noqa: ASYNC110
                await anyio.sleep(0.005)

    def _record(self, connection_id: int) -> None:
        self.connection_ids.append(connection_id)
        self.fired.set()

    def __repr__(self) -> str:
        return f"<Trigger {self.pattern!r} {self.action} fired={self.count}>"


Trigger.__module__ = "aiopg_resilient.testing"
