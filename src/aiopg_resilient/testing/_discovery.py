"""Choosing the backend of a `PostgresServer`: what can run a test server on this machine.

``backend="auto"`` picks ``env`` when ``AIOPG_RESILIENT_TEST_DSN`` is set, else ``local`` when
server binaries are found (`_find_bindir`), else ``docker`` when Docker and testcontainers work
(`_docker_usable`), else raises `ServerUnavailable` saying what to install. `_check_arguments`
validates the constructor's arguments before any of that.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from ._backends import ENV_DSN, _Backend, _EnvBackend
from ._docker import _DockerBackend
from ._errors import ServerUnavailable
from ._local import _LocalBackend

logger = logging.getLogger("aiopg_resilient.testing")

ENV_BINDIR = "AIOPG_RESILIENT_PG_BINDIR"
"""Environment variable naming the only directory searched for ``postgres`` and ``initdb``."""

BackendName = Literal["auto", "local", "env", "docker"]

_INSTALL_HINT = (
    "install PostgreSQL server binaries (apt-get install postgresql), "
    f"or set {ENV_DSN}, "
    "or install Docker and `pip install aiopg-resilient[docker]`"
)


def _version_key(bindir: Path) -> tuple[int, ...]:
    """Sort key: the version in ``.../postgresql/15/bin`` or ``.../pgsql-9.6/bin``."""
    match = re.search(r"(\d+(?:\.\d+)*)$", bindir.parent.name)
    return tuple(int(part) for part in match.group(1).split(".")) if match else (-1,)


def _has_server_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in ("postgres", "initdb"))


def _find_bindir() -> Path | None:
    """Find a directory holding the ``postgres`` and ``initdb`` executables, or None.

    ``AIOPG_RESILIENT_PG_BINDIR``, when set, is the only place searched.
    """
    override = os.environ.get(ENV_BINDIR)
    if override:
        path = Path(override)
        return path if _has_server_binaries(path) else None
    candidates: list[Path] = []
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    for pattern in (
        "/usr/lib/postgresql/*/bin",
        "/usr/pgsql-*/bin",
        "/opt/homebrew/opt/postgresql@*/bin",
        "/usr/local/opt/postgresql@*/bin",
    ):
        found = [Path(p) for p in glob.glob(pattern)]
        candidates.extend(sorted(found, key=_version_key, reverse=True))
    return next((c for c in candidates if _has_server_binaries(c)), None)


def _docker_usable() -> bool:
    """True when testcontainers is importable and ``docker info`` reaches an engine."""
    if importlib.util.find_spec("testcontainers") is None:
        return False
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        result = subprocess.run([docker, "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def _check_arguments(
    backend: str, port: int | None, settings: Mapping[str, str] | None
) -> dict[str, str]:
    """Validate `PostgresServer`'s arguments (ValueError); return a copy of the settings."""
    if backend not in ("auto", "local", "env", "docker"):
        raise ValueError(f"backend must be 'auto', 'local', 'env' or 'docker', not {backend!r}")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port must be between 1 and 65535, not {port}")
    checked = dict(settings or {})
    for key, value in checked.items():
        if not _SETTING_NAME.match(key):
            raise ValueError(f"not a PostgreSQL setting name: {key!r}")
        if not isinstance(value, str) or "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"setting {key!r} needs a one-line string value")
    return checked


def choose_backend(
    wanted: BackendName, *, ssl: bool, port: int | None, settings: Mapping[str, str]
) -> _Backend:
    """Choose the backend, as `wanted` asks, or raise ServerUnavailable."""
    env_dsn = os.environ.get(ENV_DSN)
    if wanted in ("auto", "env") and env_dsn:
        if settings or not ssl or port is not None:
            logger.warning(
                "using the existing server named by %s: ssl, port and settings are ignored",
                ENV_DSN,
            )
        return _EnvBackend(env_dsn)
    if wanted == "env":
        raise ServerUnavailable(f"backend='env' needs {ENV_DSN} set to a libpq DSN")
    reasons: list[str] = []
    if wanted in ("auto", "local"):
        bindir = _find_bindir()
        if bindir is not None:
            return _LocalBackend(bindir, ssl=ssl, port=port, settings=settings)
        where = (
            f"{ENV_BINDIR}={os.environ[ENV_BINDIR]}"
            if os.environ.get(ENV_BINDIR)
            else ("PATH, pg_config --bindir or /usr/lib/postgresql/*/bin")
        )
        reasons.append(f"no PostgreSQL server binaries (postgres, initdb) in {where}")
    if wanted in ("auto", "docker"):
        if _docker_usable():
            return _DockerBackend(ssl=ssl, port=port, settings=settings)
        reasons.append("Docker with testcontainers is not usable")
    raise ServerUnavailable(
        f"no PostgreSQL server for tests ({'; '.join(reasons)}): {_INSTALL_HINT}"
    )
