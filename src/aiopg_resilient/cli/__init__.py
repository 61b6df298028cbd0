"""The ``aiopg-resilient`` command (also ``python -m aiopg_resilient``).

Commands:

- ``demo``: the same read/write workload through plain psycopg, the usual advice
  (reconnect and retry every statement) and `ResilientPool`, while the same faults hit a
  throwaway SSL PostgreSQL; ends with a side-by-side table.
- ``doctor DSN``: finds why connections to a server die, with the evidence and what to
  do about it.

Exit status: 0 all good; 1 a problem was found (``doctor``) or the run failed
(``demo``); 2 bad usage; 3 the command could not run here (no PostgreSQL to start for
``demo``, the server unreachable for ``doctor``...).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["EXIT_CANNOT_RUN", "EXIT_OK", "EXIT_PROBLEM", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_CANNOT_RUN = 3


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (each command module registers its own)."""
    from . import demo, doctor

    parser = argparse.ArgumentParser(
        prog="aiopg-resilient",
        description="PostgreSQL on asyncio that survives the real world: see it, check it.",
        epilog="Exit status: 0 all good, 1 a problem found, 2 bad usage, 3 cannot run here.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.register(commands)
    doctor.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line *argv* (``sys.argv[1:]`` by default); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
