"""TLS and node authentication for a local deployment: a private CA with a server certificate
for the loopback names, and the SuperNodes' key pairs."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flexmoe.federated.processes import LOOPBACK
from flexmoe.io import atomic_write, private_folder


@dataclass(frozen=True)
class Certificates:
    """PEM files of a private CA and a server certificate valid for the loopback names."""

    ca: Path
    cert: Path
    key: Path


def generate_certificates(folder: Path) -> Certificates:
    """Write a fresh CA and a server certificate for 127.0.0.1/localhost into `folder`, which
    only its owner may enter (the CA is what a client of the SuperLink's APIs needs)."""
    private_folder(folder)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("flexmoe deploy-local CA")
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
    server = (
        _builder(_name("localhost"), ca_name, server_key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    certs = Certificates(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(certs.key, _pem_private_key(server_key))
    return certs


def generate_node_key(private: Path) -> Path:
    """Write a new ECDSA P-384 key pair for a SuperNode in OpenSSH format, as Flower reads it:
    the private key at mode 0600, the public key beside it (returned)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private_folder(private.parent)
    encoded = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    _write_private(private, encoded)
    public = private.with_suffix(".pub")
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return public


def _name(common_name: str) -> x509.Name:
    """An X.509 name with only a common name."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    """A certificate builder valid from an hour ago for 30 days."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An unencrypted PKCS#8 PEM encoding of `key`."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to a file only its owner can read (mode 0600 from its creation on)."""
    atomic_write(path, lambda scratch: scratch.write_bytes(data), private=True)
