"""``aiopg-resilient doctor`` (being written)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(commands: Any) -> None:
    """Add the ``doctor`` command to *commands* (an argparse subparsers action)."""
    parser: argparse.ArgumentParser = commands.add_parser("doctor", help="(being written)")
    parser.set_defaults(run=lambda args: 3)
