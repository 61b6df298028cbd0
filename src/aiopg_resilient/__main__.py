"""``python -m aiopg_resilient``: the ``aiopg-resilient`` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
