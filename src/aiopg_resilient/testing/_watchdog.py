"""Cleaning up the servers tests leave open: at interpreter exit, or if we are killed first.

Every open backend is remembered (`_remember`) until closed; atexit closes the leftovers. A
local server also gets a `_Watchdog` process, since atexit does not run when the test process
is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import subprocess
import sys
import threading
from pathlib import Path

from ._backends import _ESCALATION_TIMEOUT, _Backend

logger = logging.getLogger("aiopg_resilient.testing")

# Backends that hold a process or container, closed at interpreter exit if still open.
_OPEN_BACKENDS: set[_Backend] = set()
_OPEN_LOCK = threading.Lock()


def _remember(backend: _Backend) -> None:
    """Close this backend at interpreter exit unless `_forget` is called first."""
    with _OPEN_LOCK:
        _OPEN_BACKENDS.add(backend)


def _forget(backend: _Backend) -> None:
    """The backend is closed (or being closed): nothing left for atexit."""
    with _OPEN_LOCK:
        _OPEN_BACKENDS.discard(backend)


@atexit.register
def _close_leftovers() -> None:
    with _OPEN_LOCK:
        leftovers = list(_OPEN_BACKENDS)
        _OPEN_BACKENDS.clear()
    for backend in leftovers:
        try:
            backend.close()
        except Exception:
            logger.exception("could not close a leftover test PostgreSQL server")


_WATCHDOG_SCRIPT = """# aiopg_resilient.testing watchdog
import os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
pid = 0
for line in sys.stdin:
    pid = int(line)
if pid:
    try:
        os.killpg(pid, signal.SIGQUIT)
        for _ in range(50):
            time.sleep(0.1)
            os.killpg(pid, 0)
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class _Watchdog:
    """A tiny process that cleans up after us if we die without closing the server.

    atexit does not run when the test process is killed (``timeout`` sends SIGTERM, CI
    runners SIGKILL). The watchdog reads the postmaster's pid from a pipe; when the pipe
    closes without a final ``0`` (our process is gone), it shuts the postmaster's process
    group down and removes the temporary directory.
    """

    def __init__(self, root: Path) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG_SCRIPT, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def watch(self, pid: int) -> None:
        """Tell the watchdog which postmaster to kill (0: none is running)."""
        stdin = self._proc.stdin
        if stdin is None or stdin.closed:
            return
        with contextlib.suppress(OSError):
            stdin.write(b"%d\n" % pid)
            stdin.flush()

    def close(self) -> None:
        """Dismiss the watchdog (after the server is stopped) and reap it."""
        self.watch(0)
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(_ESCALATION_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
