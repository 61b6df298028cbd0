"""libpq functions psycopg does not expose, called through ctypes on the libpq psycopg
itself has loaded (never another libpq the process may hold), or None where it cannot be
found: each caller then keeps psycopg's own behaviour."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from typing import Any

from psycopg import pq

__all__ = ["call", "function"]

logger = logging.getLogger("aiopg_resilient.pool")


@functools.cache
def function(name: str) -> Any:
    """libpq's *name* (taking a ``PGconn *``, returning an int), or None."""
    try:
        if pq.__impl__ == "python":
            from psycopg.pq import _pq_ctypes

            func = getattr(getattr(_pq_ctypes, "pq"), name)  # noqa: B009 (untyped)
        else:
            # psycopg's compiled module links its libpq: a symbol looked up through its
            # handle is that libpq's, whatever other libpq the process has loaded.
            module = sys.modules.get(f"psycopg_{pq.__impl__}.pq")
            path = getattr(module, "__file__", None)
            if path is None:
                return None
            func = getattr(ctypes.CDLL(path, mode=os.RTLD_NOLOAD), name)
    except (ImportError, OSError, AttributeError) as exc:
        logger.debug("libpq's %s not found (%s)", name, exc)
        return None
    func.restype = ctypes.c_int
    return func


def call(name: str, pgconn: pq.abc.PGconn, *args: int) -> int | None:
    """``name(pgconn, *args)``, or None when the function or the pointer is missing."""
    func = function(name)
    pointer = getattr(pgconn, "pgconn_ptr", None)  # in every implementation, not the abc
    if func is None or pointer is None:
        return None
    func.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * len(args)
    result: int = func(pointer, *args)
    return result
