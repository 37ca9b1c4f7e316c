"""TLS for the mesh's links: a certificate authority, certificates for services, and the
gRPC credentials made from them.

`maas up` makes a CA per data directory (`.maas/tls/ca.pem`, its key beside it, owner-only)
and one certificate per service kind, valid for the local host's names; in a cluster the
operator brings certificates from its own CA (cert-manager, a Secret). Every service serves
gRPC (and the router its HTTP API) over TLS when given `--tls-cert` and `--tls-key`, and
dials other services over TLS, verifying them against `--tls-ca`, when given one. Clients
(the CLI, the `openai` client) verify the router and the other services against the same CA.

What TLS gives here is an encrypted link to a verified server. Callers prove who they are
with keys sent over that link (maas/mesh/authz.py), services included: gRPC's Python server
can either demand a client certificate from every caller or ask none, and tenants' clients
carry no certificate, so a service's identity is its service key, as a pod's is its service
account token in Kubernetes (docs/security.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from maas.mesh.errors import StartupError

CA_DAYS = 3650
CERT_DAYS = 825


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes: the CA to verify peers with; this process's certificate and key, if it serves TLS."""

    ca: bytes = b""
    cert: bytes = b""
    key: bytes = b""

    @property
    def serves(self) -> bool:
        return bool(self.cert and self.key)

    @property
    def dials(self) -> bool:
        return bool(self.ca)

    @classmethod
    def load(cls, ca: str = "", cert: str = "", key: str = "") -> TlsFiles:
        """Read the files named (empty names are left out). StartupError names a file that
        cannot be read, and a certificate given without its key or the other way round."""
        if bool(cert) != bool(key):
            raise StartupError("--tls-cert and --tls-key go together: give both or neither")

        def read(path: str, what: str) -> bytes:
            if not path:
                return b""
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise StartupError(f"cannot read the TLS {what} {path}: {e.strerror}") from None

        return cls(read(ca, "CA certificate"), read(cert, "certificate"), read(key, "key"))

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca)

    def server_ssl_context(self) -> ssl.SSLContext:
        """The same certificate for an HTTPS server (the router's OpenAI API)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory() as tmp:  # the ssl module loads a chain from files only
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            _write(cert, self.cert)
            _write(key, self.key)
            context.load_cert_chain(cert, key)
        return context


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "maas-mesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def local_hosts() -> list[str]:
    """The names a local stack's services are dialled by."""
    return sorted({"localhost", "127.0.0.1", "::1", socket.gethostname()})


def make_ca(directory: Path) -> None:
    """A CA (ca.pem, ca-key.pem owner-only) in `directory`, unless one is there."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if (directory / "ca.pem").exists() and (directory / "ca-key.pem").exists():
        return
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name(f"maas-mesh CA {directory.resolve().parent.name}")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(directory / "ca-key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    _write(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))


def issue(directory: Path, name: str, hosts: list[str]) -> tuple[Path, Path]:
    """A certificate for `name`, valid for `hosts` (DNS names or IPs) and signed by the CA
    in `directory`: (cert path, key path), reused while it covers the same hosts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    if cert_path.exists() and key_path.exists():
        existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
        have = existing.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if set(have) == set(sans) and existing.not_valid_after_utc > datetime.datetime.now(datetime.UTC):
            return cert_path, key_path
    ca_key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _write(path: Path, data: bytes) -> None:
    """Write owner-only (a key must never be readable by others, even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
