"""What the throughput and the recovery parts of bench_reads.py share: the query, the
timeouts, the logger, stopping worker tasks and naming an error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

QUERY = "SELECT 1"
SETUP_TIMEOUT = 30.0  # opening a contender (connections made, pool full)
FINISH_TIMEOUT = 10.0  # stopping worker tasks once a measurement is over

log = logging.getLogger("bench")


async def finish(tasks: Sequence[asyncio.Task[Any]], timeout: float = FINISH_TIMEOUT) -> None:
    """Wait (bounded) for tasks told to stop; cancel stragglers; retrieve every outcome."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        log.warning("%d task(s) did not stop within %.0f s; cancelled", len(pending), timeout)
        await asyncio.wait(pending, timeout=timeout)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("worker task failed: %r", task.exception())


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
