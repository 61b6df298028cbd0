"""Running the diagnosis: probe each host in turn, then the idle probe, then assess."""

from __future__ import annotations

import logging
import time

from ._idle import probe_idle
from ._model import HostReport, IdleResult
from ._probe import probe_host
from ._report import Report, assess
from ._target import Dsn

__all__ = ["diagnose"]

logger = logging.getLogger("aiopg_resilient.doctor")


async def diagnose(
    dsn: Dsn, *, timeout: float = 5.0, probe_idle_for: float | None = None
) -> Report:
    """Probe every host of *dsn* (one after another; each step bounded by *timeout*),
    then, with *probe_idle_for*, measure the path's idle timeout on the first host that
    could be logged in to; return the assessed `Report`."""
    hosts: list[HostReport] = []
    for target in dsn.targets:
        logger.info("probing %s", target.label)
        hosts.append(await probe_host(dsn, target, timeout))
    idle: IdleResult | None = None
    if probe_idle_for is not None:
        chosen = next((h for h in hosts if h.facts is not None), None)
        if chosen is not None and chosen.facts is not None:
            idle = await probe_idle(
                dsn, chosen.target, chosen.facts.sslmode, probe_idle_for, timeout
            )
    return assess(dsn, hosts, idle, time.time())
