"""The background thread a `ChaosProxy` runs its asyncio event loop in.

`_LoopThread` starts a daemon thread running a fresh event loop, carries calls from other
threads onto that loop and waits for their results (`_LoopThread.call`), and stops the loop and
joins the thread (`_LoopThread.stop`). It knows nothing of what runs on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


class _LoopThread:
    """An asyncio event loop running in its own daemon thread, started and stopped once."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        """Whether the loop is running (from `start` until `stop` begins)."""
        return self._loop is not None

    def start(self) -> None:
        """Start the thread and its loop; `call` works as soon as this returns."""
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop,), name=self._name, daemon=True
        )
        self._loop = loop
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop (tasks still pending on it are not cancelled) and join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None

    def call(self, factory: Callable[[], Coroutine[Any, Any, _T]], timeout: float) -> _T:
        """Run `factory()` on the loop and wait up to `timeout` seconds for its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the proxy is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("ChaosProxy methods cannot be called from the proxy's thread")
        future = asyncio.run_coroutine_threadsafe(factory(), loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
