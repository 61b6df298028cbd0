"""The side of a `ChaosProxy` that lives on its event loop: listening, sessions and faults.

`_ProxyLoop` holds everything the proxy's thread touches: the listening socket and the
connections it accepts (one `_Session` each), the tasks they run, the fault settings they read
(latency, accepting frozen, armed triggers), the idle cut and the counters. `ChaosProxy` carries
each public call onto the loop (`._loop_thread`) and runs the matching coroutine here; nothing
in this module may be called from another thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Coroutine
from typing import Any

from ._endpoint import _Endpoint
from ._session import _CloseHow, _Session
from ._snapshots import ConnectionSelector, ProxyConnection, ProxyStats
from ._trigger import Trigger

logger = logging.getLogger("aiopg_resilient.testing")

_IDLE_TICK = 0.05


class _ProxyLoop:
    """A proxy's listener, sessions, tasks and fault settings, all used on its event loop."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str,
        listen_port: int,
        tls: ssl.SSLContext | None,
        upstream_tls: ssl.SSLContext | None,
    ) -> None:
        self.host = listen_host
        self.port = listen_port  # the real one once listening
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.tls = tls
        self.upstream_tls = upstream_tls
        self.latency = 0.0
        self.freeze_new = False
        self.endpoints: set[_Endpoint] = set()  # every open socket, closed at shutdown
        self._listener: socket.socket | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._sessions: dict[int, _Session] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._triggers: list[Trigger] = []
        self._accepted = 0
        self._peak_open = 0
        self._ids = itertools.count(1)

    # -- tasks and sessions ----------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` as a task that `shutdown` cancels; log it if it fails."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("chaos proxy task %s failed", task.get_name(), exc_info=exc)

    def forget(self, session: _Session) -> None:
        """Drop a closing session from the open ones."""
        self._sessions.pop(session.id, None)

    # -- listening -------------------------------------------------------------------------

    async def listen(self) -> None:
        """Listen on `host`:`port` (setting `port` when it was 0); a no-op if listening."""
        if self._listener is not None:
            return
        listener = socket.create_server((self.host, self.port), backlog=128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        # A reader callback rather than a task awaiting sock_accept(): cancelling such a task
        # just as a connection arrives would lose the accepted socket.
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept_ready, listener)

    async def stop_listening(self) -> None:
        """Close the listening socket, if any; open sessions carry on."""
        listener, self._listener = self._listener, None
        if listener is not None:
            asyncio.get_running_loop().remove_reader(listener.fileno())
            listener.close()

    def _accept_ready(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("chaos proxy: accept failed: %r", exc)
                return
            try:
                sock.setblocking(False)
                client_port = sock.getpeername()[1]
            except OSError:  # the client is already gone
                sock.close()
                continue
            session = _Session(
                self, sock, next(self._ids), client_port=client_port, frozen=self.freeze_new
            )
            self._sessions[session.id] = session
            self._accepted += 1
            self._peak_open = max(self._peak_open, len(self._sessions))
            session.start()

    async def shutdown(self) -> None:
        """Stop listening, close every session and socket, cancel every task."""
        await self.stop_listening()
        await self.set_idle_cut(None)
        for session in list(self._sessions.values()):
            await session.close("close")
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        for endpoint in list(self.endpoints):
            await endpoint.close()

    # -- inspection ------------------------------------------------------------------------

    async def snapshots(self) -> list[ProxyConnection]:
        """Snapshots of the open sessions, oldest first."""
        return [session.snapshot() for session in self._sessions.values()]

    async def stats(self) -> ProxyStats:
        """The counters, with the number of sessions open now."""
        return ProxyStats(
            accepted=self._accepted, open=len(self._sessions), peak_open=self._peak_open
        )

    async def reset_stats(self) -> None:
        """`accepted` from 0, `peak_open` from the sessions open now."""
        self._accepted = 0
        self._peak_open = len(self._sessions)

    # -- faults ----------------------------------------------------------------------------

    def _select(self, which: ConnectionSelector) -> list[_Session]:
        sessions = list(self._sessions.values())
        if which is None:
            return sessions
        if callable(which):
            return [session for session in sessions if which(session.snapshot())]
        ids = set(which)
        return [session for session in sessions if session.id in ids]

    async def close_sessions(self, which: ConnectionSelector, how: _CloseHow) -> int:
        """Close the selected sessions; return how many this call closed."""
        sessions = self._select(which)
        closed = await asyncio.gather(*(session.close(how) for session in sessions))
        count = sum(closed)
        logger.info("chaos proxy: %s %d connection(s)", how, count)
        return count

    async def set_frozen(self, which: ConnectionSelector, frozen: bool) -> int:
        """Freeze or thaw the selected sessions; return how many changed."""
        sessions = [session for session in self._select(which) if session.frozen != frozen]
        for session in sessions:
            if frozen:
                session.freeze()
            else:
                session.thaw()
        logger.info(
            "chaos proxy: %s %d connection(s)", "froze" if frozen else "thawed", len(sessions)
        )
        return len(sessions)

    async def set_freeze_new(self, on: bool) -> None:
        """Accept new sessions frozen, or not."""
        self.freeze_new = on

    async def set_latency(self, seconds: float) -> None:
        """Delay every chunk by `seconds` in each direction."""
        self.latency = seconds

    async def set_idle_cut(self, seconds: float | None) -> None:
        """Cut sessions idle for longer than `seconds` (replacing any idle cut); None: off."""
        if self._idle_task is not None:
            self._idle_task.cancel()
            await asyncio.wait([self._idle_task])
            self._idle_task = None
        if seconds is not None:
            self._idle_task = self.spawn(self._watch_idle(seconds), "chaos-proxy-idle-cut")

    async def _watch_idle(self, seconds: float) -> None:
        tick = min(_IDLE_TICK, seconds / 4)
        while True:
            await asyncio.sleep(tick)
            deadline = time.monotonic() - seconds
            for session in list(self._sessions.values()):
                if session.upstream is not None and session.last_activity < deadline:
                    logger.info("chaos proxy: idle cut of connection %d", session.id)
                    self.spawn(session.close("cut"), f"chaos-proxy-idle-cut-{session.id}")

    # -- triggers --------------------------------------------------------------------------

    async def add_trigger(self, trigger: Trigger) -> None:
        """Arm `trigger` on every session."""
        self._triggers.append(trigger)

    async def remove_trigger(self, trigger: Trigger) -> None:
        """Disarm `trigger`; a no-op if it is not armed."""
        with contextlib.suppress(ValueError):
            self._triggers.remove(trigger)

    def match_trigger(self, data: bytes) -> Trigger | None:
        """The first armed trigger whose pattern is in `data` (disarmed if it fires once)."""
        for trigger in self._triggers:
            if trigger.pattern in data:
                if trigger.once:
                    self._triggers.remove(trigger)
                return trigger
        return None
