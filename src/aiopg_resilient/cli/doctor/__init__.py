"""``aiopg-resilient doctor DSN``: why do connections to this server die?

The troubleshooting checklist, run against the real server: reachability and login
latency of each host, what each sslmode gives, the server certificate (expiry, chain,
host name), the server settings that cut or keep connections, how full the server is,
primary or standby, a pooler in the path, the client's keepalives, and with
``--probe-idle`` the idle timeout of the network path, measured. Each finding has a
severity (ok, info, warning, problem), the evidence and what to do; the report ends with
the conninfo and `ResilientPool` settings to use. See ``docs/doctor.md``.

Exit status: 0 no problem (warnings allowed, unless ``--strict``), 1 a problem found,
2 a bad DSN or option, 3 no host could be logged in to (what was found is still printed).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import anyio

from .. import EXIT_USAGE
from ._render import to_json, to_text
from ._run import diagnose
from ._target import DsnError, parse_dsn

__all__ = ["register", "run"]

_MAX_PROBE_IDLE = 7200.0


def _positive(limit: float) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not 0 < value <= limit:
            raise argparse.ArgumentTypeError(f"must be > 0 and <= {limit:g} seconds")
        return value

    return parse


def register(commands: Any) -> None:
    """Add the ``doctor`` command to *commands* (an argparse subparsers action)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "doctor",
        help="find why connections to a server die, and what to change",
        description=(
            "Run the connection troubleshooting checklist against a real server: each host's "
            "reachability and login time, what each sslmode gives, the certificate's expiry, "
            "chain and host name, the server settings that cut connections, free connection "
            "slots, primary or standby, PgBouncer in the path, the client's TCP keepalives; "
            "with --probe-idle, the idle timeout of the network path. Passwords are never "
            "printed."
        ),
        epilog=(
            "Exit status: 0 no problem (warnings allowed unless --strict), 1 a problem found, "
            "2 bad DSN or option, 3 no host could be logged in to. Details: docs/doctor.md."
        ),
    )
    parser.add_argument(
        "dsn",
        metavar="DSN",
        nargs="?",
        default="",
        help="libpq conninfo ('host=db.example dbname=app user=app') or URL "
        "('postgresql://app@db.example/app'); PG* variables apply as in libpq",
    )
    parser.add_argument(
        "--timeout",
        type=_positive(120.0),
        default=5.0,
        metavar="SECONDS",
        help="give up on each probe (connect, login, query) after this long (default: 5)",
    )
    parser.add_argument(
        "--probe-idle",
        type=_positive(_MAX_PROBE_IDLE),
        default=None,
        metavar="SECONDS",
        help="also hold up to 41 connections idle for up to SECONDS and report after how "
        "long the path cuts them, and what keeps them (takes up to SECONDS)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print every check, not only what needs care"
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 on warnings too")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the command from parsed *args*; print the report; return the exit status."""
    try:
        dsn = parse_dsn(args.dsn, os.environ)
    except DsnError as exc:
        print(f"aiopg-resilient doctor: bad DSN: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = anyio.run(lambda: diagnose(dsn, timeout=args.timeout, probe_idle_for=args.probe_idle))
    if args.json:
        print(to_json(report, strict=args.strict))
    else:
        print(to_text(report, verbose=args.verbose))
    return report.exit_status(strict=args.strict)
