"""``aiopg-resilient demo``: the same read/write workload three ways, under the same faults.

A throwaway PostgreSQL (``ssl=on``) from `aiopg_resilient.testing`, a TLS-terminating
proxy in front of it, and, one after the other, plain psycopg, the usual advice (reconnect
and retry every statement) and `ResilientPool`, each for the same time under the same
faults: a TLS proxy cut, a backend terminated, a lost COMMIT reply, a restart, a crash.
After each run the rows are counted on the server. Ends with a side-by-side table.

Exit status: 0 when every fault was staged and the pool showed no error, no doubled or
lost write and no write reported failed yet applied; 1 otherwise; 3 when no PostgreSQL
server can be started here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from typing import Any, TextIO

import anyio

from .. import EXIT_CANNOT_RUN, EXIT_OK, EXIT_PROBLEM
from ._plan import FAULT_KINDS, MIN_SECONDS, Plan, fault_kind, parse_faults
from ._progress import Progress, capture_logs

__all__ = ["register", "run"]

_DESCRIPTION = """\
A throwaway PostgreSQL (ssl=on) from aiopg_resilient.testing, a TLS-terminating proxy in
front of it, and, one after the other, plain psycopg, the usual advice (reconnect and retry
every statement) and ResilientPool, each for the same time under the same faults. After each
run the rows are counted on the server. Ends with a side-by-side table."""

_INSTALL = """\
The demo needs a PostgreSQL server it can start, restart and crash: it starts a throwaway
one (any version >= 13) from the server binaries, or in Docker. Install one of them:
  Debian, Ubuntu:  sudo apt-get install postgresql
  Fedora, RHEL:    sudo dnf install postgresql-server
  macOS:           brew install postgresql
  Docker:          a running Docker engine, and pip install 'aiopg-resilient[docker]'
(AIOPG_RESILIENT_PG_BINDIR names the directory of postgres and initdb if they are elsewhere.)"""


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= MIN_SECONDS or value > 3600:
        raise argparse.ArgumentTypeError(f"must be between {MIN_SECONDS:g} and 3600")
    return value


def _faults(text: str) -> tuple[str, ...]:
    try:
        return parse_faults(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError("must be between 1 and 64")
    return value


def register(commands: Any) -> None:
    """Add the ``demo`` command to *commands* (an argparse subparsers action)."""
    faults = "\n".join(f"  {k.key:12} {k.label}:\n  {'':12} {k.what}" for k in FAULT_KINDS)
    parser: argparse.ArgumentParser = commands.add_parser(
        "demo",
        help="plain psycopg, the usual advice and ResilientPool under the same real faults",
        description=_DESCRIPTION,
        epilog=f"faults:\n{faults}\n\nexit status: 0 the pool kept its promise; 1 it did not, "
        "or a fault could not be staged;\n3 no PostgreSQL server can be started here",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--seconds",
        type=_seconds,
        default=60.0,
        metavar="N",
        help="how long the three runs last in all, at least 3 (default 60: 20 s each)",
    )
    parser.add_argument(
        "--faults",
        type=_faults,
        default=parse_faults("all"),
        metavar="LIST",
        help="comma-separated faults to stage, in this order (default all: "
        + ",".join(k.key for k in FAULT_KINDS)
        + ")",
    )
    parser.add_argument(
        "--workers",
        type=_workers,
        default=8,
        metavar="N",
        help="concurrent tasks doing reads and writes (default 8)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON on stdout (the progress goes to stderr)",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show the library's log lines after each run (they never interleave)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo as *args* say; return the exit status."""
    plan = Plan.for_total(args.seconds, args.faults, args.workers)
    stream: TextIO = sys.stderr if args.json else sys.stdout
    progress = Progress(stream, live=stream.isatty())
    level = logging.INFO if args.verbose else logging.WARNING
    with capture_logs(level) as logs:
        try:
            report, status = anyio.run(_demo, plan, progress, logs, args.verbose)
        except _CannotRun as exc:
            progress.clear()
            print(f"aiopg-resilient demo: {exc}\n{_INSTALL}", file=sys.stderr)
            return EXIT_CANNOT_RUN
        except Exception as exc:  # a failure of the run itself: say it, keep the status
            progress.clear()
            print(f"aiopg-resilient demo: the run failed: {exc!r}", file=sys.stderr)
            if args.verbose:
                traceback.print_exc()
            return EXIT_PROBLEM
    if args.json:
        print(json.dumps(report, indent=2))
    return status


class _CannotRun(Exception):
    """No server the demo can control."""


async def _demo(
    plan: Plan, progress: Progress, logs: Any, verbose: bool
) -> tuple[dict[str, Any], int]:
    # Imported here: `--help` must not need the test helpers (trustme...).
    from ...testing import ServerControlUnavailable, ServerUnavailable
    from ._contenders import CONTENDERS
    from ._runner import Session, open_server
    from ._table import findings, render_table, report_json, verdict

    say = progress
    say.line("aiopg-resilient demo: starting a throwaway PostgreSQL (ssl=on) ...")
    try:
        pg = await open_server()
    except (ServerUnavailable, ServerControlUnavailable, RuntimeError, OSError) as exc:
        reasons = "\n".join(f"  - {line}" for line in str(exc).splitlines())
        raise _CannotRun(f"no PostgreSQL server can be started here:\n{reasons}") from None
    async with pg:
        session = Session(pg, plan, progress, logs, verbose=verbose)
        version = await session.prepare()
        say.line(f"PostgreSQL {version} on {pg.host}:{pg.port}, behind a TLS-terminating proxy.")
        say.line(
            f"{plan.workers} workers, {plan.write_share:.0%} writes (each inserts a unique id "
            "into a table without a unique constraint, so a doubled write shows)."
        )
        say.line(
            f"The three run one after the other, {plan.run_seconds:.1f} s each, under the same "
            "faults at the same moments:"
        )
        for key, due in plan.schedule:
            kind = fault_kind(key)
            say.line(f"    {due:6.1f} s  {kind.label}: {kind.what}")
        session.flush_logs()
        say.line()
        runs = []
        for index, contender in enumerate(CONTENDERS, 1):
            runs.append(await session.run(index, contender))
            say.line()
    results = [r.result for r in runs]
    complete = all(r.complete for r in runs)
    failure = verdict(results, complete=complete)
    status = EXIT_OK if failure is None else EXIT_PROBLEM
    say.line("Counted on the server after each run:")
    say.line()
    say.line(render_table(results))
    say.line()
    for line in findings(results):
        say.line(line)
    say.line()
    if failure is None:
        say.line(
            "ResilientPool kept its promise: no error reached the application, no write was "
            "doubled, lost, or reported failed yet applied."
        )
    else:
        say.line(f"PROBLEM: {failure}")
    report = report_json(
        plan,
        results,
        {r.result.key: r.marks for r in runs},
        {r.result.key: r.notes for r in runs},
        {"version": version, "ssl": True, "proxy": "TLS-terminating"},
        exit_status=status,
    )
    return report, status
