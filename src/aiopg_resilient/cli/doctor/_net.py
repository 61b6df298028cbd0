"""Network probes below libpq: a TCP connect, the server's TLS.

Blocking socket code, bounded by socket timeouts; the doctor runs it in a worker thread.
The TLS probe is what ``openssl s_client -starttls postgres`` does: PostgreSQL's
SSLRequest on a plain socket, then a TLS handshake, then the peer certificate. It sends
no startup packet, so the server logs nothing and starts no session.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import time
from pathlib import Path

from ._cert import from_der, from_ssl_dict, hostname_matches
from ._model import CertInfo, TlsProbe

__all__ = ["TrustSpec", "tcp_connect", "tls_probe", "trust_from"]

logger = logging.getLogger("aiopg_resilient.doctor")

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
TrustSpec = tuple[str, str | None]
"""(description, CA file or None for the system store)."""


def tcp_connect(address: str, port: str, timeout: float) -> float:
    """Connect to *address*:*port* and close; return how long it took in ms."""
    start = time.perf_counter()
    with socket.create_connection((address, int(port)), timeout=timeout):
        return (time.perf_counter() - start) * 1000


def trust_from(sslrootcert: str | None) -> TrustSpec:
    """Where libpq would take the trusted CAs from, for *sslrootcert*."""
    if sslrootcert == "system":
        return "the system store (sslrootcert=system)", None
    if sslrootcert:
        return f"sslrootcert={sslrootcert}", os.path.expanduser(sslrootcert)
    default = Path.home() / ".postgresql" / "root.crt"
    if default.exists():
        return f"{default} (libpq's default sslrootcert)", str(default)
    return "the system store (no sslrootcert given: libpq needs sslrootcert=system)", None


def _starttls(address: str, port: str, timeout: float) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection((address, int(port)), timeout=timeout)
    try:
        sock.sendall(_SSL_REQUEST)
        answer = sock.recv(1)
    except BaseException:
        sock.close()
        raise
    return sock, answer


def _handshake(
    sock: socket.socket, context: ssl.SSLContext, server_name: str | None
) -> ssl.SSLSocket:
    return context.wrap_socket(sock, server_hostname=server_name)


def _close(tls: ssl.SSLSocket) -> None:
    try:
        tls.unwrap().close()  # a close_notify: the server sees a clean end, logs nothing
    except (OSError, ValueError):
        tls.close()


def _sni(host: str | None) -> str | None:
    """The name to send as SNI (libpq sends host names, not IP addresses)."""
    if not host:
        return None
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return host
    return None


def tls_probe(
    address: str, port: str, host: str | None, trust: TrustSpec, timeout: float
) -> TlsProbe:
    """Ask the server at *address*:*port* for TLS; read and check its certificate for
    *host* (the name libpq's verify-full checks) against *trust*."""
    try:
        sock, answer = _starttls(address, port, timeout)
    except TimeoutError:
        return TlsProbe(None, error=f"no answer to the SSLRequest within {timeout:g} s")
    except OSError as exc:
        return TlsProbe(None, error=f"SSLRequest failed: {exc}")
    if answer != b"S":
        sock.close()
        if answer == b"N":
            return TlsProbe(False)
        what = "closed the connection" if not answer else f"answered {answer!r}"
        return TlsProbe(None, error=f"the server {what} instead of 'S' or 'N'")
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain.check_hostname = False
    plain.verify_mode = ssl.CERT_NONE
    try:
        tls = _handshake(sock, plain, _sni(host))
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        return TlsProbe(True, error=f"TLS handshake failed: {exc}")
    try:
        der = tls.getpeercert(binary_form=True)
        protocol, cipher = tls.version(), (tls.cipher() or ("",))[0]
    finally:
        _close(tls)
    cert = from_der(der) if der else None
    chain_ok, chain_error, decoded = _verify(address, port, host, trust, timeout)
    if cert is None and decoded is not None:
        cert = decoded
    hostname_ok: bool | None = None
    hostname_error = None
    if cert is not None and host:
        hostname_ok = hostname_matches(cert, host)
        if not hostname_ok:
            hostname_error = _names_text(cert, host)
    return TlsProbe(
        True,
        protocol=protocol,
        cipher=cipher or None,
        cert=cert,
        chain_ok=chain_ok,
        chain_error=chain_error,
        hostname_ok=hostname_ok,
        hostname_error=hostname_error,
        trust=trust[0],
    )


def _names_text(cert: CertInfo, host: str) -> str:
    names = [f"DNS:{n}" for n in cert.dns_names] + [f"IP:{ip}" for ip in cert.ip_addresses]
    if not names and cert.common_name:
        names = [f"CN={cert.common_name}"]
    return f"the certificate is for {', '.join(names) or 'no name'}, not {host}"


def _verify(
    address: str, port: str, host: str | None, trust: TrustSpec, timeout: float
) -> tuple[bool | None, str | None, CertInfo | None]:
    """A second handshake that checks the chain (not the name): (verified, error,
    the certificate as `ssl` decodes a verified one)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        if trust[1] is None:
            context.load_default_certs()
        else:
            context.load_verify_locations(cafile=trust[1])
    except (OSError, ssl.SSLError) as exc:
        return None, f"cannot read {trust[0]}: {exc}", None
    try:
        sock, answer = _starttls(address, port, timeout)
    except OSError as exc:
        return None, f"second connection failed: {exc}", None
    if answer != b"S":
        sock.close()
        return None, "the server stopped offering TLS", None
    try:
        tls = _handshake(sock, context, _sni(host))
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        return False, str(exc.verify_message or exc), None
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        return None, f"TLS handshake failed: {exc}", None
    try:
        decoded = from_ssl_dict(tls.getpeercert() or {})
    finally:
        _close(tls)
    return True, None, decoded
