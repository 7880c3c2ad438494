"""A development certificate authority for the broker's TLS listener.

Production sets the operator's PKI files instead (``BrokerSettings.tls_cafile`` and friends).
Here a CA (EC P-256, ten years) signs a server certificate (one year) whose subject
alternative names are the host names and addresses devices use; private keys are written
0600. The CA is made once and kept, because provisioned devices hold it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aggregator.broker.registry import atomic_write

__all__ = ["ensure", "san_names"]

_RENEW_BEFORE = dt.timedelta(days=30)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def san_names(cert_file: Path) -> set[str]:
    """The DNS names and addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(a) for a in san.get_values_for_type(x509.IPAddress)
    }


def _make_ca(ca_cert: Path, ca_key: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cwg development CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    # The key first: a certificate without its key would be kept and never signed with.
    atomic_write(ca_key, _key_pem(key), mode=0o600)
    atomic_write(ca_cert, _cert_pem(cert), mode=0o644)


def _make_server(
    ca_cert: Path, ca_key: Path, cert_file: Path, key_file: Path, names: Sequence[str]
) -> None:
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
        .sign(signer, hashes.SHA256())
    )
    atomic_write(key_file, _key_pem(key), mode=0o600)
    atomic_write(cert_file, _cert_pem(cert), mode=0o644)


def _server_current(cert_file: Path, key_file: Path, names: Sequence[str]) -> bool:
    if not (cert_file.is_file() and key_file.is_file()):
        return False
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    if cert.not_valid_after_utc - _now() < _RENEW_BEFORE:
        return False
    return san_names(cert_file) == {str(_general_name(n).value) for n in names}


def ensure(
    ca_cert: Path, ca_key: Path, cert_file: Path, key_file: Path, names: Sequence[str]
) -> bool:
    """Make what is missing or stale; True when the server certificate was (re)made."""
    if not (ca_cert.is_file() and ca_key.is_file()):
        _make_ca(ca_cert, ca_key)
        cert_file.unlink(missing_ok=True)  # signed by a CA that no longer exists
    if _server_current(cert_file, key_file, names):
        return False
    _make_server(ca_cert, ca_key, cert_file, key_file, names)
    return True
