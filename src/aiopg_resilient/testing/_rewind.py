"""Whether a stopped server can follow another's timeline as it is, and ``pg_rewind`` if not.

Read from ``pg_controldata`` of the stopped server (where and how its WAL ends) and the
timeline history file of the new primary (where its timeline forked off). `._switchover`
demotes with these.
"""

from __future__ import annotations

import logging
import subprocess
import time

from ._admin import _query
from ._local import _LocalBackend

__all__ = ["REWIND_SETTINGS"]

logger = logging.getLogger("aiopg_resilient.testing")

# Configuration files that pg_rewind would replace with the new primary's copies.
_OWN_FILES = ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pg_ident.conf")

REWIND_SETTINGS: dict[str, str] = {
    "wal_log_hints": "on",  # or data checksums: pg_rewind refuses a target without either
    "full_page_writes": "on",  # pg_rewind refuses a source without it
    "wal_keep_size": "64MB",  # the target's WAL back to the last checkpoint before the fork
}
"""``PostgresServer(settings=REWIND_SETTINGS)`` (a standby copies them): demoting a server
whose WAL went past the fork point of the new primary's timeline needs them (`pg_rewind`)."""


def _timeline(backend: _LocalBackend) -> int:
    """The timeline a running primary writes on (pg_control_checkpoint() may lag behind)."""
    rows = _query(backend.admin_conninfo(), "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    return int(rows[0][0][:8], 16)


def _controldata(backend: _LocalBackend) -> dict[str, str]:
    """``pg_controldata`` of a (stopped) local server, as a dict of its lines."""
    result = subprocess.run(
        [str(backend._bindir / "pg_controldata"), "-D", str(backend.data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=60,
        check=False,
        **backend._child_kwargs(),
    )
    output = result.stdout.decode("utf-8", "replace")
    if result.returncode != 0:
        raise RuntimeError(f"pg_controldata failed (exit code {result.returncode}):\n{output}")
    return {
        key.strip(): value.strip()
        for key, sep, value in (line.partition(":") for line in output.splitlines())
        if sep
    }


def _lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def _divergence(control: dict[str, str], new: _LocalBackend) -> str | None:
    """Why the stopped server cannot simply follow ``new``'s timeline; None if it can."""
    state = control["Database cluster state"]
    if state not in ("shut down", "shut down in recovery"):
        return f"it was not shut down cleanly (cluster state: {state})"
    tli = int(control["Latest checkpoint's TimeLineID"])
    end = max(
        _lsn(control["Latest checkpoint location"]),
        _lsn(control["Minimum recovery ending location"]),
    )
    new_tli = _timeline(new)
    if tli == new_tli:
        return None
    history = _query(
        new.admin_conninfo(), "SELECT pg_read_file(%s)", [f"pg_wal/{new_tli:08X}.history"]
    )
    for line in str(history[0][0]).splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit() and int(fields[0]) == tli:
            if end < _lsn(fields[1]):
                return None
            return (
                f"its WAL on timeline {tli} goes up to {end >> 32:X}/{end & 0xFFFFFFFF:X}, "
                f"past {fields[1]} where timeline {new_tli} of the new primary forked off"
            )
    return f"its timeline {tli} is not in the history of the new primary's timeline {new_tli}"


def _rewind(old: _LocalBackend, new: _LocalBackend, control: dict[str, str], why: str) -> None:
    """``pg_rewind`` the stopped ``old`` to ``new``'s timeline, keeping its own config files."""
    hints = control.get("wal_log_hints setting") == "on"
    checksums = control.get("Data page checksum version", "0") != "0"
    fpw = _query(new.admin_conninfo(), "SHOW full_page_writes")[0][0]
    if not (hints or checksums) or fpw != "on":
        raise RuntimeError(
            f"the server on port {old.port} cannot follow port {new.port}: {why}; that needs "
            "pg_rewind, hence wal_log_hints=on (or data checksums) on it and "
            "full_page_writes=on on the new primary: start the primary with "
            "PostgresServer(settings=REWIND_SETTINGS)"
        )
    assert old.data_dir is not None
    saved = {name: (old.data_dir / name).read_bytes() for name in _OWN_FILES}
    started = time.monotonic()
    # pg_rewind reads the source's timeline from its control file: until the checkpoint a
    # promotion requests has finished, that still says the old one ("no rewind required").
    _query(new.admin_conninfo(), "CHECKPOINT")
    try:
        old._run(
            [
                str(old._bindir / "pg_rewind"),
                f"--target-pgdata={old.data_dir}",
                f"--source-server={new.admin_conninfo()}",
                "--no-sync",
            ],
            "pg_rewind",
        )
    finally:
        for name, content in saved.items():
            (old.data_dir / name).write_bytes(content)
    elapsed = time.monotonic() - started
    logger.info("pg_rewind of port %d to port %d (%s): %.2f s", old.port, new.port, why, elapsed)
