"""The ``docker`` backend: ``postgres:15`` in a container, through testcontainers.

A thin backend: testcontainers (``aiopg-resilient[docker]``) is imported only when it opens,
and stopping the server sends the signal of the stop mode to the container through the SDK.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg

from ._backends import (
    _ESCALATION_TIMEOUT,
    _MODE_SIGNALS,
    THROWAWAY_SETTINGS,
    StopMode,
    _ControlledBackend,
    _free_port,
)
from ._certs import _Tls

logger = logging.getLogger("aiopg_resilient.testing")

_DOCKER_START_TIMEOUT = 120.0  # a first run may pull the image
_DOCKER_IMAGE = "postgres:15"


class _DockerBackend(_ControlledBackend):
    """``postgres:15`` in a container through testcontainers (thin; signals via the SDK)."""

    name = "docker"

    def __init__(self, *, ssl: bool, port: int | None, settings: Mapping[str, str]) -> None:
        self.ssl = ssl
        self.port = port if port is not None else 0
        self._settings = dict(settings)
        self.password = secrets.token_urlsafe(24)
        self._root: Path | None = None
        self._tls: _Tls | None = None
        self._container: Any = None

    def open(self) -> None:
        container_module: Any = importlib.import_module("testcontainers.core.container")
        self._root = root = Path(tempfile.mkdtemp(prefix="aiopg-resilient-pg-"))
        if self.port == 0:
            self.port = _free_port()
        settings = {
            **THROWAWAY_SETTINGS,
        }
        script = 'exec docker-entrypoint.sh "$@"'
        if self.ssl:
            self._tls = _Tls(root / "tls")
            self.ca_path = self._tls.ca_path
            # The container reads the files as another uid; the key is copied inside with the
            # owner and mode PostgreSQL insists on.
            os.chmod(root / "tls", 0o755)
            os.chmod(self._tls.key_path, 0o644)
            script = (
                "set -e; d=/var/lib/postgresql; "
                "install -o postgres -g postgres -m 0600 /tls/server.key $d/server.key; "
                "install -o postgres -g postgres -m 0644 /tls/server.crt $d/server.crt; " + script
            )
            settings.update(
                ssl="on",
                ssl_cert_file="/var/lib/postgresql/server.crt",
                ssl_key_file="/var/lib/postgresql/server.key",
            )
        settings.update(self._settings)
        command = ["postgres"]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        container = (
            container_module.DockerContainer(_DOCKER_IMAGE)
            .with_env("POSTGRES_PASSWORD", self.password)
            .with_bind_ports(5432, self.port)
            .with_command(command)
            .with_kwargs(entrypoint=["bash", "-c", script, "bash"])
        )
        if self._tls is not None:
            container = container.with_volume_mapping(str(root / "tls"), "/tls", "ro")
        self._container = container
        container.start()
        host = str(container.get_container_host_ip())
        self.host = "127.0.0.1" if host in ("localhost", "127.0.0.1") else host
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _DOCKER_START_TIMEOUT
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL in Docker did not accept connections within "
                        f"{_DOCKER_START_TIMEOUT:.0f} s: {exc}"
                    ) from None
            time.sleep(0.2)

    @property
    def running(self) -> bool:
        if self._container is None:
            return False
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return bool(wrapped.status == "running")

    def start(self) -> None:
        if self.running:
            return
        self._container.get_wrapped_container().start()
        self._wait_ready()

    def stop(self, mode: StopMode, timeout: float) -> None:
        if not self.running:
            return
        wrapped = self._container.get_wrapped_container()
        wrapped.kill(signal=_MODE_SIGNALS[mode])
        try:
            wrapped.wait(timeout=timeout)
        except Exception:
            logger.warning("PostgreSQL in Docker did not stop in %s mode; killing it", mode)
            wrapped.kill()
            wrapped.wait(timeout=_ESCALATION_TIMEOUT)

    def close(self) -> None:
        try:
            if self._container is not None:
                self._container.stop()
                self._container = None
        finally:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None
