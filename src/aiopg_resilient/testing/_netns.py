"""A private network namespace joined to this one by a veth pair, with a real blackhole.

For tests of what happens when the network silently stops delivering packets (a router or
firewall that drops them, a peer that lost power): no FIN, no RST, no ICMP, nothing. The
test process stays in its own (root) network namespace; a client runs in the new namespace
(`VethNamespace.command` prefixes ``ip netns exec``) and reaches the root-side end of the
veth pair, where a server or a `ChaosProxy` listens::

    with VethNamespace() as ns:
        proxy = ChaosProxy(pg.host, pg.port, listen_host=ns.host_address)
        client = subprocess.Popen(ns.command(sys.executable, "client.py"))
        ns.blackhole()      # from now on every IP packet either way is dropped
        ...
        ns.restore()

Every packet stays on the veth pair between the two namespaces: nothing is routed, and
nothing can leave the machine.

`blackhole` drops IPv4 and IPv6 packets where they *arrive*, with an nftables ``netdev``
ingress rule on each end of the pair (in the new namespace for packets towards the client,
in the root namespace for packets towards the server), so each sender's kernel saw its
packets leave normally, as on a real network. Dropping them on the way out instead (an
``output`` rule, ``ip route add blackhole``, a ``tc`` drop action) makes the sender's own
send fail (EPERM, EINVAL, ENOBUFS), which TCP treats as local congestion: its retransmission
and keepalive timers then behave differently from a real outage. ARP still passes, so the
neighbours stay resolved: with ARP dropped too, the kernel would report "No route to host"
to the socket, which a blackhole further away never does.

Linux only, as root, with ``ip`` (iproute2) and ``nft`` (nftables); `unavailable` says why
not. Private: not exported by `aiopg_resilient.testing`.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
from types import TracebackType

__all__ = ["NetnsError", "VethNamespace", "unavailable"]

_PREFIX = "aiopgr"
"""Network namespaces are ``aiopgr-<pid>x<n>``, root nft tables ``aiopgr_<pid>x<n>``."""
_STALE = re.compile(rf"^{_PREFIX}-(\d+)x(\d+)$")
_SUBNET = ipaddress.IPv4Network("10.231.0.0/16")
"""The private range the /30 of each pair is taken from."""
_SYSTEM_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
_COMMAND_TIMEOUT = 15.0
_counter = itertools.count()
_open: set[VethNamespace] = set()
_open_lock = threading.Lock()


class NetnsError(RuntimeError):
    """An ``ip`` or ``nft`` command failed (the message has its stderr)."""


def _tool(name: str) -> str | None:
    # /usr/sbin is not on every PATH (Debian's for users other than root).
    return shutil.which(name) or shutil.which(name, path=_SYSTEM_PATH)


def _run(argv: list[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise NetnsError(f"{' '.join(argv)}: {detail}")
    return proc


def _tools() -> tuple[str, str]:
    ip, nft = _tool("ip"), _tool("nft")
    if ip is None:
        raise NetnsError("the `ip` command is not installed (Debian package iproute2)")
    if nft is None:
        raise NetnsError("the `nft` command is not installed (Debian package nftables)")
    return ip, nft


def _drop_table(table: str, device: str) -> str:
    """An nft script: drop every IP packet arriving on *device* (ARP still passes)."""
    return (
        f"table netdev {table} {{\n"
        f"  chain blackhole {{\n"
        f'    type filter hook ingress device "{device}" priority -500; policy accept;\n'
        f"    meta protocol {{ ip, ip6 }} counter drop\n"
        f"  }}\n"
        f"}}\n"
    )


def unavailable() -> str | None:
    """Why `VethNamespace` cannot work on this machine, or None when it can.

    Beyond the cheap checks (Linux, root, the tools) it creates and deletes a probe
    namespace with a veth pair and a ``netdev`` table, since containers often forbid one
    of them.
    """
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces and nftables rules needs root"
    try:
        ip, nft = _tools()
    except NetnsError as exc:
        return str(exc)
    tag = f"{os.getpid()}x{next(_counter) % 1000}"
    name, host, peer = f"{_PREFIX}-{tag}", f"ar{tag}h", f"ar{tag}n"
    try:
        _run([ip, "netns", "add", name])
        _run([ip, "link", "add", host, "type", "veth", "peer", "name", peer, "netns", name])
        _run([ip, "netns", "exec", name, nft, "-f", "-"], stdin=_drop_table("probe", peer))
    except NetnsError as exc:
        return f"network namespaces with veth pairs and nftables are not usable here: {exc}"
    finally:
        for argv in ([ip, "link", "del", host], [ip, "netns", "del", name]):
            with contextlib.suppress(NetnsError):  # not created
                _run(argv)
    return None


class VethNamespace:
    """A new network namespace joined to the root one by a veth pair on a private /30.

    Use it as a context manager; closing deletes the namespace, the pair and any rule, and
    so does interpreter exit if a test forgot to. Leftovers of a killed process (named after
    its pid) are deleted by the next `open` on the machine.

    The root-namespace end has `host_address`, the other end `ns_address` (both in
    10.231.0.0/16); run a process in the namespace with `command`.
    """

    def __init__(self) -> None:
        self._ip, self._nft = _tools()
        tag = f"{os.getpid()}x{next(_counter) % 1000}"
        self.name = f"{_PREFIX}-{tag}"
        """The network namespace, as ``ip netns`` knows it."""
        self.host_ifname = f"ar{tag}h"
        """The end of the pair in the root namespace."""
        self.ns_ifname = f"ar{tag}n"
        """The end of the pair in the new namespace."""
        self._table = f"{_PREFIX}_{tag}"
        self.host_address = ""
        """The address of `host_ifname`, where a server for the namespace listens."""
        self.ns_address = ""
        """The address of `ns_ifname`, which processes in the namespace connect from."""
        self._created = False
        self._blackholed = False

    # -- lifecycle --

    def open(self) -> VethNamespace:
        """Create the namespace and the pair, up and addressed. Opened once."""
        if self._created:
            raise RuntimeError("a VethNamespace is opened once")
        _sweep_stale(self._ip, self._nft)
        network = self._free_network()
        host, peer = list(network.hosts())
        self.host_address, self.ns_address = str(host), str(peer)
        prefix = network.prefixlen
        ip = self._ip
        self._created = True
        with _open_lock:
            _open.add(self)
        try:
            _run([ip, "netns", "add", self.name])
            pair = [self.host_ifname, "type", "veth", "peer", "name", self.ns_ifname]
            _run([ip, "link", "add", *pair, "netns", self.name])
            _run([ip, "addr", "add", f"{host}/{prefix}", "dev", self.host_ifname])
            _run([ip, "link", "set", self.host_ifname, "up"])
            _run([ip, "-n", self.name, "addr", "add", f"{peer}/{prefix}", "dev", self.ns_ifname])
            _run([ip, "-n", self.name, "link", "set", self.ns_ifname, "up"])
            _run([ip, "-n", self.name, "link", "set", "lo", "up"])
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete the rules, the pair and the namespace; raise if something is left."""
        if not self._created:
            return
        with _open_lock:
            _open.discard(self)
        _delete(self._ip, self._nft, self.name, self.host_ifname, self._table)
        self._blackholed = False
        left = _leftovers(self._ip, self._nft, self.name, self.host_ifname, self._table)
        if left:
            raise NetnsError(f"could not delete {', '.join(left)}")

    def __enter__(self) -> VethNamespace:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<VethNamespace {self.name} {self.host_ifname}={self.host_address or '?'} "
            f"{self.ns_ifname}={self.ns_address or '?'} blackholed={self._blackholed}>"
        )

    # -- use --

    def command(self, *argv: str) -> list[str]:
        """*argv* to run inside the namespace (with ``ip netns exec``)."""
        return [self._ip, "netns", "exec", self.name, *argv]

    @property
    def blackholed(self) -> bool:
        """Whether packets are being dropped."""
        return self._blackholed

    def blackhole(self) -> None:
        """Drop every IP packet either way between the namespaces, silently, from now on."""
        if not self._created:
            raise RuntimeError("the VethNamespace is not open")
        if self._blackholed:
            return
        self._blackholed = True  # so that close() deletes a half-made blackhole
        # Towards the client first, then towards the server: at most a few milliseconds
        # apart, and no reply to a packet that got through can get back after the first.
        _run(self.command(self._nft, "-f", "-"), stdin=_drop_table(self._table, self.ns_ifname))
        _run([self._nft, "-f", "-"], stdin=_drop_table(self._table, self.host_ifname))

    def restore(self) -> None:
        """Deliver packets again (those dropped meanwhile are gone)."""
        if not self._blackholed:
            return
        for nft in ([self._nft], self.command(self._nft)):
            try:
                _run([*nft, "delete", "table", "netdev", self._table])
            except NetnsError:
                if _has_table(nft, self._table):
                    raise
                # not made: blackhole() failed half-way
        self._blackholed = False

    def dropped(self) -> int:
        """How many packets the blackhole has dropped so far (both ends)."""
        total = 0
        if self._blackholed:
            for prefix in ([self._nft], self.command(self._nft)):
                listing = _run([*prefix, "list", "table", "netdev", self._table]).stdout
                total += sum(int(n) for n in re.findall(r"counter packets (\d+)", listing))
        return total

    # -- helpers --

    def _free_network(self) -> ipaddress.IPv4Network:
        """A /30 of `_SUBNET` that no address in the root namespace overlaps."""
        listing = _run([self._ip, "-4", "-o", "addr", "show"]).stdout
        used = [
            ipaddress.IPv4Interface(m).network
            for m in re.findall(r"\binet (\d+\.\d+\.\d+\.\d+/\d+)", listing)
        ]
        blocks = list(_SUBNET.subnets(new_prefix=30))
        start = (os.getpid() * 61 + next(_counter) * 7) % len(blocks)
        for i in range(len(blocks)):
            candidate = blocks[(start + i) % len(blocks)]
            if not any(candidate.overlaps(net) for net in used):
                return candidate
        raise NetnsError(f"no free /30 left in {_SUBNET}")


def _has_table(nft: list[str], table: str) -> bool:
    """Whether the ``netdev`` table exists (*nft* runs in the namespace it looks in)."""
    try:
        listing = _run([*nft, "list", "tables", "netdev"]).stdout
    except NetnsError:
        return False
    return re.search(rf"^table netdev {re.escape(table)}$", listing, re.M) is not None


def _delete(ip: str, nft: str, name: str, host_ifname: str, table: str) -> None:
    """Best effort: the root table, the pair (deleting one end deletes both), the namespace
    (with its own table). The pair goes first: a namespace only disappears once the last
    process in it has exited, and its devices with it."""
    for argv in (
        [nft, "delete", "table", "netdev", table],
        [ip, "link", "del", host_ifname],
        [ip, "netns", "del", name],
    ):
        with contextlib.suppress(NetnsError):  # not there: _leftovers checks what is left
            _run(argv)


def _leftovers(ip: str, nft: str, name: str, host_ifname: str, table: str) -> list[str]:
    left = []
    if re.search(rf"^{re.escape(name)}(\s|$)", _run([ip, "netns", "list"]).stdout, re.M):
        left.append(f"network namespace {name}")
    if (
        subprocess.run(
            [ip, "link", "show", host_ifname], capture_output=True, check=False
        ).returncode
        == 0
    ):
        left.append(f"interface {host_ifname}")
    if _has_table([nft], table):
        left.append(f"nft table netdev {table}")
    return left


def _sweep_stale(ip: str, nft: str) -> None:
    """Delete what a killed process (whose pid is gone) left behind."""
    try:
        listing = _run([ip, "netns", "list"]).stdout
    except NetnsError:
        return
    for line in listing.splitlines():
        match = _STALE.match(line.split(" ", 1)[0])
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        tag = f"{match.group(1)}x{match.group(2)}"
        _delete(ip, nft, match.group(0), f"ar{tag}h", f"{_PREFIX}_{tag}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@atexit.register
def _close_leftovers() -> None:
    with _open_lock:
        leftovers = list(_open)
    for ns in leftovers:
        try:
            ns.close()
        except Exception as exc:
            print(f"aiopg_resilient.testing: {exc}", file=sys.stderr)
