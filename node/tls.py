"""TLS contexts for DICOM (PS3.15 Annex B.9, the BCP 195 Secure Transport Connection
Profile) and HTTPS, built with Python's :mod:`ssl` (OpenSSL).

BCP 195 (RFC 9325): TLS 1.2 or newer only; for TLS 1.2, AEAD cipher suites with
forward secrecy (ECDHE or DHE key exchange, AES-GCM or ChaCha20-Poly1305); no
compression, no renegotiation by the client. TLS 1.3 suites are all AEAD and are left to
OpenSSL's defaults.
"""

from __future__ import annotations

import ssl
from pathlib import Path

# OpenSSL cipher string for TLS 1.2 (RFC 9325 4.2: the recommended suites and their
# ChaCha20 equivalents); TLS 1.3 is configured separately by OpenSSL.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def server_context(certificate: Path, private_key: Path, ca_certificates: Path | None, require_client_certificate: bool) -> ssl.SSLContext:
    """The listener's context: its certificate and key; client certificates must chain
    to ``ca_certificates`` (required when ``require_client_certificate``, else checked
    only when a client offers one).

    Raises:
        OSError, ssl.SSLError: a file is missing or not a certificate / key.
    """
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(certfile=str(certificate), keyfile=str(private_key))
    if ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(ca_certificates))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(ca_certificates: Path | None = None, certificate: Path | None = None, private_key: Path | None = None) -> ssl.SSLContext:
    """A context that verifies the server's certificate (against ``ca_certificates``, or
    the system's trusted CAs when None) and its host name, and presents ``certificate``
    when given.

    Raises:
        OSError, ssl.SSLError: a file is missing or not a certificate / key.
    """
    ctx = _harden(ssl.create_default_context(cafile=str(ca_certificates) if ca_certificates else None))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if certificate is not None:
        ctx.load_cert_chain(certfile=str(certificate), keyfile=str(private_key) if private_key else None)
    return ctx


def _verified_certificate(sock) -> dict:
    """The peer's certificate as ``getpeercert`` gives it, which is only once it was
    verified against the context's CAs ({} when the connection is not TLS or the peer
    presented none)."""
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return {}
    try:
        return getpeercert() or {}
    except (ValueError, OSError):
        return {}


def peer_common_name(sock) -> str:
    """The Common Name (CN) of the peer's verified certificate ("" when the connection
    is not TLS, the peer presented none, or its certificate has no CN or several)."""
    names = [v for rdn in _verified_certificate(sock).get("subject", ()) for k, v in rdn if k == "commonName"]
    return names[-1] if len(names) == 1 else ""  # several CNs: ambiguous, bound to none


def peer_subject(sock) -> str:
    """The subject of the peer's verified certificate as ``CN=...,O=...`` ("" when the
    connection is not TLS or the peer presented none)."""
    cert = _verified_certificate(sock)
    if not cert:
        return ""
    parts = [f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}
    return ",".join(short.get(p.split("=", 1)[0], p.split("=", 1)[0]) + "=" + p.split("=", 1)[1] for p in parts)
