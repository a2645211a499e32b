"""TLS: the startup check of `--ssl-certfile` / `--ssl-keyfile`, and the self-signed certificate
that `hearth cert` makes for a LAN box.

uvicorn's own errors for a bad pair are an OpenSSL trace after the model has loaded; the check
here runs when the settings are made and says what is wrong: a missing or unreadable file, a
certificate that is expired or not yet valid, or a key that does not belong to the certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertInfo:
    subject: str
    not_after: datetime.datetime
    sha256: str  # "AB:CD:...": what a client pins or compares


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def fingerprint(cert: x509.Certificate) -> str:
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def check_tls_files(certfile: str | None, keyfile: str | None) -> CertInfo | None:
    """Raise ValueError unless both files are given, readable, valid now and a matching pair."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile (make a pair with "
                         "`hearth cert`)")
    cert = _load_cert(Path(certfile))
    key = _load_key(Path(keyfile))
    now = _utcnow()
    if cert.not_valid_after_utc < now:
        raise ValueError(f"the certificate {certfile} expired on "
                         f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; make a new one "
                         "(`hearth cert`) or renew it")
    if cert.not_valid_before_utc > now:
        raise ValueError(f"the certificate {certfile} is not valid before "
                         f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)")
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise ValueError(f"the key {keyfile} does not belong to the certificate {certfile}: "
                         "give the key the certificate was made with")
    return CertInfo(cert.subject.rfc4514_string(), cert.not_valid_after_utc, fingerprint(cert))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read the TLS {what} {path}: {error.strerror}") from None


def _load_cert(path: Path) -> x509.Certificate:
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ValueError(f"{path} is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def _load_key(path: Path):  # noqa: ANN202 - one of cryptography's private key types
    data = _read(path, "key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not an unencrypted PEM private key: {error}") from None


def _public_der(public_key) -> bytes:  # noqa: ANN001
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def make_self_signed(names: list[str], days: int) -> tuple[bytes, bytes, CertInfo]:
    """(certificate PEM, key PEM, info): an ECDSA P-256 certificate for `names` (DNS names or
    IP addresses), valid for `days` days from now."""
    if not names:
        raise ValueError("give at least one host name or address for the certificate")
    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    now = _utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    info = CertInfo(subject.rfc4514_string(), cert.not_valid_after_utc, fingerprint(cert))
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, info


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def default_names() -> list[str]:
    """This machine's host name, localhost and the loopback addresses."""
    names = [socket.gethostname(), "localhost", "127.0.0.1", "::1"]
    return list(dict.fromkeys(n for n in names if n))
