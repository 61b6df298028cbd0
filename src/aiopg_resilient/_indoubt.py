"""In-doubt commit resolution, the I/O part: send COMMIT, watch it, resolve it.

`send_commit` sends COMMIT and waits for its answer, for as long as the server works on
it: a COMMIT is never cancelled (a cancel during a synchronous-replication wait would
turn "committed locally, not replicated" into a success). When the answer is late by
``patience`` (``heartbeat_timeout``), it looks at the old backend from another
connection: busy with the COMMIT -> keep waiting; idle (the answer was lost on a silent
path) -> its status answers; still idle in the transaction (the COMMIT never arrived) ->
terminated, then its status answers. `resolve` does the same after the connection died.
Every path ends in committed, aborted or `CommitUnknown` (with the id): whatever fails
while resolving (no free connection, an outage, a permission error) is `CommitUnknown`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from psycopg import AsyncCursor

from ._commit import RESOLVE_QUERY, TERMINATE_QUERY, Pending, Probe, Step, Verdict, decide
from ._driver import DriverConnection
from ._errors import CommitUnknown, Failure, classify
from ._retry import Backoff, RetryPolicy

__all__ = ["Resolver"]

logger = logging.getLogger("aiopg_resilient.pool")

# Runs one query on another connection (replayed on connection failures) -> first row.
Run = Callable[[str, dict[str, Any]], Awaitable[Any]]


class _Outcome:
    """What became of one COMMIT message (internal)."""

    __slots__ = ("answered", "error", "verdict")

    def __init__(self) -> None:
        self.answered = False
        self.error: Exception | None = None
        self.verdict: Verdict | None = None


class Resolver:
    """Commits a pending transaction and resolves its outcome when the answer is lost."""

    def __init__(
        self,
        run: Run,
        *,
        patience: float,
        retry: RetryPolicy,
        rng: random.Random,
        raise_only: bool,
        emit: Callable[..., None],
    ) -> None:
        self._run = run
        self._patience = patience
        self._retry = retry
        self._rng = rng
        self._raise_only = raise_only
        self._emit = emit

    async def commit(
        self,
        conn: DriverConnection,
        pending: Pending | None,
        deadline: float,
        drop: Callable[[BaseException], Awaitable[None]],
    ) -> bool:
        """COMMIT *conn*'s transaction: True if committed (or it wrote nothing), False if
        proven aborted. An error the server answered COMMIT with (a deferred constraint,
        a serialization failure) is raised as it is: the transaction was rolled back.
        Raises `CommitUnknown` when the outcome cannot be known, including when the
        caller is cancelled while COMMIT is out. *drop(exc)* is called once the
        connection is known dead or abandoned, before resolving."""
        out = _Outcome()
        try:
            await self._send(conn, pending, out)
            if out.answered:
                return True
            if out.error is not None and not conn.closed and not _lost_answer(out.error):
                raise out.error  # the server answered COMMIT with an error: rolled back
            cause = out.error or TimeoutError(f"no answer to COMMIT within {self._patience:.3g}s")
            await drop(cause)
            if pending is None:
                return True  # the transaction wrote nothing: nothing to lose
            if out.verdict is None:
                return await self.resolve(pending, deadline, cause)
            return self._conclude(pending, out.verdict, cause)
        except BaseException as exc:
            if isinstance(exc, Exception) or out.answered or pending is None:
                raise
            # The caller gave up (its deadline, a client gone) while COMMIT was out or
            # its outcome was being looked up.
            logger.warning(
                "caller cancelled while the COMMIT of transaction %s was outstanding; "
                "its outcome is unknown",
                pending.xid,
            )
            self._emit("commit_unknown", xid=pending.xid, outcome="unknown")
            raise CommitUnknown(
                f"cancelled while the COMMIT of transaction {pending.xid} was outstanding: "
                "it may or may not have been applied",
                xid=pending.xid,
            ) from exc

    async def _send(self, conn: DriverConnection, pending: Pending | None, out: _Outcome) -> None:
        """Send COMMIT; wait for its answer, looking at the old backend from another
        connection each time *patience* passes without one, until that proves the
        outcome. The COMMIT runs in a task of its own, so that giving up on it (a
        verdict, the caller's cancellation) never cancels it on the server."""
        task = asyncio.ensure_future(_commit_answer(conn))
        try:
            done, _ = await asyncio.wait({task}, timeout=self._patience)
            while not done:
                verdict = await self._look(pending)
                if verdict is not None:
                    out.verdict = verdict
                    task.cancel()  # closes the connection; no cancel request
                    await asyncio.wait({task})
                    break
                done, _ = await asyncio.wait({task}, timeout=self._patience)
        except BaseException:
            task.cancel()
            task.add_done_callback(_retrieve)
            raise
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            out.answered, out.verdict = True, None
        elif isinstance(error, Exception):
            out.error = error
        else:  # pragma: no cover - a KeyboardInterrupt inside the task
            raise error

    async def _look(self, pending: Pending | None) -> Verdict | None:
        """No answer to COMMIT within patience: a final verdict, or None to keep waiting
        (the old backend is busy with it: a synchronous-replication wait...)."""
        if pending is None:
            # Nothing was written: the outcome does not matter.
            return Verdict(Step.COMMITTED, "the transaction wrote nothing")
        try:
            verdict = await self._probe(pending)
            while verdict.step is Step.TERMINATE:
                verdict = await self._probe(pending)
        except Exception as exc:
            return Verdict(Step.UNKNOWN, f"no answer to COMMIT, and cannot look: {exc}")
        if not verdict.final:
            return None
        logger.warning(
            "no answer to the COMMIT of transaction %s within %.3gs: %s",
            pending.xid,
            self._patience,
            verdict.step.value,
        )
        return verdict

    async def _probe(self, pending: Pending) -> Verdict:
        params = {"xid": str(pending.xid), "pid": pending.pid}
        verdict = decide(pending, Probe.from_row(await self._run(RESOLVE_QUERY, params)))
        if verdict.step is Step.TERMINATE:
            logger.warning(
                "terminating backend %s: it is idle in transaction %s (its COMMIT never came)",
                pending.pid,
                pending.xid,
            )
            await self._run(TERMINATE_QUERY, params)
        return verdict

    async def resolve(self, pending: Pending, deadline: float, cause: BaseException) -> bool:
        """Learn what became of *pending* after its connection died; True if committed."""
        logger.warning("commit of transaction %s in doubt (%s): resolving", pending.xid, cause)
        if self._raise_only:
            return self._conclude(pending, Verdict(Step.UNKNOWN, "in_doubt='raise'"), cause)
        # Resolution gets a budget of its own even when the operation's is nearly spent.
        deadline = max(deadline, time.monotonic() + 4 * self._patience)
        backoff = Backoff(self._retry, self._rng)
        verdict = Verdict(Step.UNKNOWN, "timed out")
        try:
            with anyio.fail_after(max(deadline - time.monotonic(), 0.0)):
                while True:
                    verdict = await self._probe(pending)
                    if verdict.final:
                        break
                    await anyio.sleep(0.0 if verdict.step is Step.TERMINATE else backoff.next())
        except TimeoutError:
            verdict = Verdict(Step.UNKNOWN, f"still undecided: {verdict.reason or 'timed out'}")
        except Exception as exc:  # guarantee 13: never PoolTimeout or a raw error here
            verdict = Verdict(Step.UNKNOWN, f"could not look it up: {exc}")
        return self._conclude(pending, verdict, cause)

    def _conclude(self, pending: Pending, verdict: Verdict, cause: BaseException | None) -> bool:
        if self._raise_only and verdict.step is not Step.UNKNOWN:
            verdict = Verdict(Step.UNKNOWN, f"in_doubt='raise' ({verdict.step.value})")
        if verdict.step is Step.UNKNOWN:
            self._emit("commit_unknown", xid=pending.xid, outcome="unknown")
            logger.warning("outcome of transaction %s unknown: %s", pending.xid, verdict.reason)
            raise CommitUnknown(
                f"outcome of the COMMIT of transaction {pending.xid} unknown: {verdict.reason}",
                xid=pending.xid,
            ) from cause
        self._emit("commit_resolved", xid=pending.xid, outcome=verdict.step.value)
        logger.warning("transaction %s resolved: %s", pending.xid, verdict.step.value)
        return verdict.step is Step.COMMITTED


def _lost_answer(exc: Exception) -> bool:
    """A FATAL of the server (terminated, shut down) read before libpq saw the EOF: not an
    answer to COMMIT, which may have completed before it."""
    return classify(exc) is Failure.CONNECTION


async def _commit_answer(conn: DriverConnection) -> None:
    """COMMIT, with the connection told not to cancel it if this task is cancelled."""
    conn.protect_commit = True
    try:
        await AsyncCursor(conn).execute(b"COMMIT", prepare=False)
    finally:
        conn.protect_commit = False


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # abandoned: its outcome is resolved elsewhere
