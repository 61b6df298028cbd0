"""pytest plugin of aiopg_resilient: a real PostgreSQL with TLS and a chaos proxy as fixtures.

Installed with the package (entry point ``pytest11``), so a test suite gets:

* ``pg_server`` (session): a `PostgresServer`, started once for the session.
* ``pg``: the same server, started again first if an earlier test stopped it.
* ``pg_dsn``: its DSN (``sslmode=verify-full``, password auth).
* ``pg_standby``: a hot standby of it (`StandbyServer`), closed after the test, which leaves
  the primary as it was (no synchronous mode, no replication slot); local backend only.
* ``chaos_proxy``: a started `ChaosProxy` in front of it (TLS passes through end to end).
* ``tls_chaos_proxy``: the same, terminating TLS itself (clients keep ``verify-full``).

Tests using them are marked ``postgres`` (and ``chaos`` for the proxies) at collection, so
``pytest -m "not postgres"`` runs without a server. When such a test fails, the part of the
server log written during the test is attached to the report.

Which server is used follows `PostgresServer`'s ``backend="auto"``: ``AIOPG_RESILIENT_TEST_DSN``,
else local server binaries, else Docker.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ._proxy import ChaosProxy
    from ._replica import StandbyServer
    from ._server import PostgresServer

_POSTGRES_FIXTURES = frozenset(
    {"pg_server", "pg", "pg_dsn", "pg_standby", "chaos_proxy", "tls_chaos_proxy"}
)
_CHAOS_FIXTURES = frozenset({"chaos_proxy", "tls_chaos_proxy"})
_LOG_MAX_BYTES = 64 * 1024
_log_start = pytest.StashKey["tuple[PostgresServer, int]"]()


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers the fixtures add."""
    config.addinivalue_line("markers", "postgres: uses a real PostgreSQL server (pg fixtures)")
    config.addinivalue_line("markers", "chaos: injects network faults through a ChaosProxy")
    config.addinivalue_line("markers", "slow: takes seconds (chaos soaks, restarts)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the fixtures they use, before ``-m`` selects them."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _POSTGRES_FIXTURES:
            item.add_marker(pytest.mark.postgres)
        if names & _CHAOS_FIXTURES:
            item.add_marker(pytest.mark.chaos)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the server log written during a failed test to its report."""
    report = yield
    start = item.stash.get(_log_start, None)
    if start is not None and report.when == "call" and report.failed:
        server, offset = start
        text = _read_log(server, offset)
        if text:
            report.sections.append(("PostgreSQL server log during the test", text))
    return report


def _log_size(server: PostgresServer) -> int | None:
    path = server.log_path
    if path is None:
        return None
    try:
        return path.stat().st_size
    except OSError:
        return None


def _read_log(server: PostgresServer, offset: int) -> str:
    try:
        path = server.log_path
        if path is None:
            return ""
        with path.open("rb") as f:
            end = f.seek(0, 2)
            f.seek(max(offset, end - _LOG_MAX_BYTES))
            return f.read().decode("utf-8", "replace")
    except (OSError, RuntimeError):
        return ""


def _mark(request: pytest.FixtureRequest, name: str) -> None:
    if request.node.get_closest_marker(name) is None:
        request.node.add_marker(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server with TLS for the whole session."""
    from ._server import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg(pg_server: PostgresServer, request: pytest.FixtureRequest) -> PostgresServer:
    """The session's server, running (started again if an earlier test stopped it)."""
    _mark(request, "postgres")
    if pg_server.backend != "env" and not pg_server.running:
        pg_server.start_sync()
    size = _log_size(pg_server)
    if size is not None:
        request.node.stash[_log_start] = (pg_server, size)
    return pg_server


@pytest.fixture
def pg_dsn(pg: PostgresServer) -> str:
    """DSN of the running server: password auth, ``sslmode=verify-full``."""
    return pg.dsn


@pytest.fixture
def pg_standby(pg: PostgresServer) -> Iterator[StandbyServer]:
    """A streaming hot standby of `pg`; closing it afterwards undoes synchronous mode."""
    from ._errors import ServerControlUnavailable

    try:
        standby = pg.start_standby_sync()
    except ServerControlUnavailable as exc:
        pytest.skip(f"pg_standby: {exc}")
    with standby:
        yield standby


@pytest.fixture
def chaos_proxy(pg: PostgresServer, request: pytest.FixtureRequest) -> Iterator[ChaosProxy]:
    """A started TCP `ChaosProxy` in front of `pg`; TLS passes through it end to end."""
    from ._proxy import ChaosProxy

    _mark(request, "chaos")
    with ChaosProxy.for_server(pg, tls=False) as proxy:
        yield proxy


@pytest.fixture
def tls_chaos_proxy(pg: PostgresServer, request: pytest.FixtureRequest) -> Iterator[ChaosProxy]:
    """A started `ChaosProxy` that terminates TLS (certificate from the server's test CA)."""
    from ._proxy import ChaosProxy
    from ._server import ServerControlUnavailable

    _mark(request, "chaos")
    try:
        proxy = ChaosProxy.for_server(pg, tls=True)
    except ServerControlUnavailable as exc:
        pytest.skip(f"tls_chaos_proxy: {exc}")
    with proxy:
        yield proxy


@pytest.fixture
def fast_retries() -> Iterator[None]:
    """Shrink every aiopg_resilient retry delay and budget 100x for the test, then restore."""
    from .._retry import fast_retries as shrink

    with shrink():
        yield
