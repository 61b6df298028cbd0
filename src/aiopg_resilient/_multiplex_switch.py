"""The switch of multiplexed reads: ``multiplex=`` or the ``AIOPG_RESILIENT_MULTIPLEX``
environment variable, and the psycopg versions it pays off on (see `_multiplex`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import psycopg

from ._blocks import held_here
from ._multiplex import Multiplexer

__all__ = ["ENV", "PIPELINES_PAY", "attach"]

logger = logging.getLogger("aiopg_resilient.pool")

ENV = "AIOPG_RESILIENT_MULTIPLEX"
PIPELINES_PAY = tuple(int(p) for p in psycopg.__version__.split(".")[:2]) >= (3, 3)
"""psycopg 3.3 or later: 32 tasks over 8 connections did 21,200 reads/s multiplexed
against 9,600 without; psycopg 3.2.4 did 3,000 against 5,600 (its pipeline mode)."""


def attach(pool: Any, multiplex: bool | None) -> Multiplexer | None:
    """The multiplexer of *pool*'s reads, or None: *multiplex*, or when it is None the
    ``AIOPG_RESILIENT_MULTIPLEX`` environment variable (``1``, ``true``, ``yes``, ``on``)."""
    if multiplex is None:
        multiplex = os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if not multiplex:
        return None
    if not PIPELINES_PAY:
        logger.warning(
            "pool %r: multiplexed reads need psycopg >= 3.3 (this is %s, whose pipeline "
            "mode made them twice as slow as a connection per read); reads take a "
            "connection each",
            pool.name,
            psycopg.__version__,
        )
        return None
    ops = pool._ops
    return Multiplexer(
        pool,
        retry=pool.retry,
        rng=pool._rng,
        events=pool._events,
        watch=ops._watched,
        direct=lambda stmt: ops._replay(stmt.run, stmt.size),
        holding=lambda: held_here(pool) > 0,
    )
