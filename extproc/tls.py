"""A self-signed certificate for Envoy's local TLS listener.

``envoy.tls.self_signed`` in the fleet file asks for one when the configured files do not exist. It is for
local use only: clients have to trust it explicitly (or skip verification).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from extproc.config import is_ip

# Long enough that a local stack never trips over it, short enough to stay within what browsers and
# TLS libraries accept for leaf certificates (398 days).
VALIDITY = dt.timedelta(days=365)
# Every name a local client may use for the loopback listener, whatever ``hosts`` says.
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def ensure_self_signed(cert_file: Path, key_file: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1")) -> bool:
    """Create a self-signed certificate and its key unless both files already exist.

    The certificate is an EC P-256 leaf (fast handshakes, accepted everywhere) valid for a year, with a
    subjectAltName for each of ``hosts`` (IP literals become IP entries, anything else a DNS entry) plus
    localhost, 127.0.0.1 and ::1. The key file is written with mode 0600. Existing files are never
    overwritten: if only one of them is missing both are written anew, since a lone certificate or key is
    useless. Returns whether files were written.
    """
    cert_file, key_file = Path(cert_file), Path(key_file)
    if cert_file.exists() and key_file.exists():
        return False

    key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys([*hosts, *_LOOPBACK_NAMES]))  # ordered, without repeats
    common_name = next((n for n in names if not is_ip(n)), "localhost")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdated a little so a client whose clock is slightly behind still accepts it.
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )

    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _write_private(key_file, key_pem)
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    cert_file.write_bytes(cert_pem)
    return True


def _san(name: str) -> x509.GeneralName:
    if is_ip(name):
        return x509.IPAddress(ipaddress.ip_address(name))
    return x509.DNSName(name)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` so that the file is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # O_CREAT's mode does not apply to a file that already existed
        out.write(data)
