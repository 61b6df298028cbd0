"""Reading a server certificate and matching it to a host name. Pure.

The certificate's DER is parsed with ``cryptography`` when it is importable (it is an
optional dependency: trustme and most TLS stacks bring it). Without it, the doctor still
has what Python's `ssl` gives: the decoded certificate of a handshake that verified, and
the verification error of one that did not (``certificate has expired``, ``Hostname
mismatch``, ``unable to get local issuer certificate``).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping
from typing import Any

from ._model import CertInfo

__all__ = ["from_der", "from_ssl_dict", "hostname_matches"]


def from_der(der: bytes) -> CertInfo | None:
    """The certificate *der*, parsed with ``cryptography``; None without it (or if it
    cannot parse it)."""
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    # cryptography >= 42 has the *_utc properties; older ones naive UTC datetimes.
    not_before = getattr(cert, "not_valid_before_utc", None) or cert.not_valid_before
    not_after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else None
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=_epoch(not_before),
        not_after=_epoch(not_after),
        dns_names=dns,
        ip_addresses=ips,
        common_name=common_name,
    )


def _epoch(moment: Any) -> float:
    if moment.tzinfo is None:
        import datetime

        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return float(moment.timestamp())


def _name(parts: Any) -> str:
    """``((('commonName', 'x'),), ...)`` as ``commonName=x, ...``."""
    return ", ".join(f"{k}={v}" for rdn in parts for (k, v) in rdn)


def from_ssl_dict(decoded: Mapping[str, Any]) -> CertInfo | None:
    """The certificate as `ssl.SSLSocket.getpeercert` decodes it (verified handshakes
    only); None if it lacks the dates."""
    try:
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except (KeyError, ValueError):
        return None
    dns = tuple(v for k, v in decoded.get("subjectAltName", ()) if k == "DNS")
    ips = tuple(v for k, v in decoded.get("subjectAltName", ()) if k == "IP Address")
    common = [v for rdn in decoded.get("subject", ()) for (k, v) in rdn if k == "commonName"]
    return CertInfo(
        subject=_name(decoded.get("subject", ())),
        issuer=_name(decoded.get("issuer", ())),
        not_before=float(not_before),
        not_after=float(not_after),
        dns_names=dns,
        ip_addresses=tuple(ip.strip() for ip in ips),
        common_name=common[0] if common else None,
    )


def hostname_matches(cert: CertInfo, host: str) -> bool:
    """Whether *cert* is valid for *host* as libpq's verify-full checks it: an IP
    address against the IP subjectAltNames, a name against the DNS ones (a ``*`` for the
    whole leftmost label), the common name only when there are no DNS names."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        if any(_same_ip(address, ip) for ip in cert.ip_addresses):
            return True
        # libpq accepts an IP address written in a DNS name or the CN too.
        names = cert.dns_names or ((cert.common_name,) if cert.common_name else ())
        return any(name == host for name in names)
    names = cert.dns_names or ((cert.common_name,) if cert.common_name else ())
    return any(_name_matches(name, host) for name in names)


def _same_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> bool:
    try:
        return ipaddress.ip_address(text.strip()) == address
    except ValueError:
        return False


def _name_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern == host:
        return True
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return False
