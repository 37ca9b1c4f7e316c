"""Configuration shared by every service: built once from flags/env, frozen, validated."""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from maas.mesh.errors import StartupError
from maas.mesh.logs import in_container
from maas.mesh.tls import TlsFiles

DEFAULT_ETCD = "http://127.0.0.1:2379"
DEFAULT_NATS = "nats://127.0.0.1:4222"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def parse_host_port(url: str, default_port: int) -> tuple[str, int]:
    """'http://h:1' / 'h:1' / 'h' -> ('h', 1)."""
    parsed = urlparse(url if "://" in url else f"tcp://{url}")
    if not parsed.hostname:
        raise StartupError(f"invalid address {url!r}: expected host:port or a URL")
    return parsed.hostname, parsed.port or default_port


def url_credentials(url: str) -> tuple[str | None, str | None]:
    """(user, password) in a URL's userinfo (`http://root:secret@host:2379`), else (None, None)."""
    parsed = urlparse(url if "://" in url else f"tcp://{url}")
    if parsed.username and parsed.password:
        return unquote(parsed.username), unquote(parsed.password)
    return None, None


def redact(url: str) -> str:
    """A URL fit to print or log: the credentials in it (a NATS token, a password) hidden."""
    scheme, sep, rest = url.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}***@{host}" if at else url


@dataclass(frozen=True)
class MeshConfig:
    """How a process joins the mesh."""

    kind: str
    """Service kind: router, worker, registry or scheduler."""
    etcd: str = DEFAULT_ETCD
    """etcd endpoint URL (MAAS_ETCD); `http://user:password@host:2379` where etcd checks users."""
    nats: str = DEFAULT_NATS
    """NATS server URL (MAAS_NATS)."""
    prefix: str = "/maas/"
    """Prefix of every etcd key the mesh uses (MAAS_PREFIX); lets several meshes share one etcd."""
    lease_ttl: int = 5
    """Seconds a process's etcd lease lives without keepalive (MAAS_LEASE_TTL)."""
    host: str = "127.0.0.1"
    """Address the gRPC server binds (MAAS_HOST)."""
    advertise_host: str = ""
    """Address other services dial (MAAS_ADVERTISE_HOST); defaults to host, or the hostname when host is 0.0.0.0."""
    port: int = 0
    """gRPC port; 0 picks a free one (published in etcd)."""
    metrics_port: int = 0
    """Prometheus /metrics port; 0 picks a free one, -1 disables."""
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    """Instance id, unique within the kind."""
    startup_timeout: float = 10.0
    """Seconds to wait for etcd and NATS at start before giving up with an error."""
    grace: float = 10.0
    """Seconds in-flight requests get to finish on shutdown."""
    log_json: bool = False
    log_level: str = "INFO"
    credential: str = field(default="", repr=False)
    """This service's own key (a service credential, see docs/security.md), sent on every
    call it makes to another service (--credential-file, MAAS_CREDENTIAL_FILE or MAAS_CREDENTIAL)."""
    insecure: bool = False
    """Trust every caller as the admin, checking no credential (--insecure, MAAS_INSECURE=1).
    For a throwaway development mesh only."""
    tls: TlsFiles = field(default_factory=TlsFiles, repr=False)
    """Serve over TLS with this certificate and key; dial the other services over TLS,
    verifying them against this CA (--tls-cert, --tls-key, --tls-ca; see maas/mesh/tls.py)."""

    def __post_init__(self) -> None:
        if self.lease_ttl < 2:
            raise StartupError("lease TTL must be at least 2 seconds")
        if not 0 <= self.port <= 65535:
            raise StartupError(f"port {self.port} is out of range")
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise StartupError(f"etcd prefix {self.prefix!r} must start and end with '/'")
        parse_host_port(self.etcd, 2379)
        parse_host_port(self.nats, 4222)

    @property
    def dial_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::", ""):
            return socket.gethostname()
        return self.host

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, *, default_port: int = 0) -> None:
        g = parser.add_argument_group("mesh")
        g.add_argument("--etcd", default=_env("MAAS_ETCD", DEFAULT_ETCD), help="etcd URL (env MAAS_ETCD)")
        g.add_argument("--nats", default=_env("MAAS_NATS", DEFAULT_NATS), help="NATS URL (env MAAS_NATS)")
        g.add_argument("--prefix", default=_env("MAAS_PREFIX", "/maas/"), help="etcd key prefix")
        g.add_argument("--lease-ttl", type=int, default=int(_env("MAAS_LEASE_TTL", "5")))
        g.add_argument("--host", default=_env("MAAS_HOST", "127.0.0.1"), help="address to bind")
        g.add_argument("--advertise-host", default=_env("MAAS_ADVERTISE_HOST", ""))
        g.add_argument("--port", type=int, default=default_port, help="gRPC port (0: any free port)")
        g.add_argument("--metrics-port", type=int, default=int(_env("MAAS_METRICS_PORT", "0")),
                       help="Prometheus port (0: any free port, -1: off)")
        g.add_argument("--instance", default=_env("MAAS_INSTANCE", ""), help="instance id")
        g.add_argument("--grace", type=float, default=10.0, help="seconds to finish requests on shutdown")
        g.add_argument("--log-format", choices=("auto", "text", "json"), default=_env("MAAS_LOG_FORMAT", "auto"),
                       help="log lines as text or JSON; auto (default): JSON in a container (Docker, Kubernetes), "
                            "text elsewhere (env MAAS_LOG_FORMAT)")
        g.add_argument("--log-json", action="store_true", default=_env("MAAS_LOG_JSON", "") == "1",
                       help="the same as --log-format json")
        g.add_argument("--log-level", default=_env("MAAS_LOG_LEVEL", "INFO"))
        g.add_argument("--credential-file", default=_env("MAAS_CREDENTIAL_FILE", ""),
                       help="file holding this service's key, made with `maas keys create --service KIND` "
                            "(env MAAS_CREDENTIAL_FILE, or the key itself in MAAS_CREDENTIAL)")
        g.add_argument("--tls-ca", default=_env("MAAS_TLS_CA", ""),
                       help="CA certificate (PEM) to verify the other services with; dial them over TLS (env MAAS_TLS_CA)")
        g.add_argument("--tls-cert", default=_env("MAAS_TLS_CERT", ""),
                       help="certificate (PEM) to serve gRPC (and the router's HTTP API) over TLS (env MAAS_TLS_CERT)")
        g.add_argument("--tls-key", default=_env("MAAS_TLS_KEY", ""),
                       help="the certificate's private key (PEM; env MAAS_TLS_KEY)")
        g.add_argument("--insecure", action="store_true", default=_env("MAAS_INSECURE", "") == "1",
                       help="check no credentials: every caller is the admin (development only; env MAAS_INSECURE=1)")

    @classmethod
    def from_args(cls, kind: str, ns: argparse.Namespace) -> MeshConfig:
        extra = {"instance": ns.instance} if ns.instance else {}
        return cls(kind=kind, etcd=ns.etcd, nats=ns.nats, prefix=ns.prefix, lease_ttl=ns.lease_ttl,
                   host=ns.host, advertise_host=ns.advertise_host, port=ns.port,
                   metrics_port=ns.metrics_port, grace=ns.grace,
                   log_json=ns.log_json or ns.log_format == "json" or (ns.log_format == "auto" and in_container()),
                   log_level=ns.log_level, credential=read_credential(ns.credential_file, "MAAS_CREDENTIAL"),
                   insecure=ns.insecure, tls=TlsFiles.load(ns.tls_ca, ns.tls_cert, ns.tls_key), **extra)


def read_credential(path: str, env: str) -> str:
    """A secret from a file (stripped), else from the environment variable `env`."""
    if path:
        try:
            return open(path).read().strip()  # noqa: SIM115 - read once at start
        except OSError as e:
            raise StartupError(f"cannot read the credential file {path}: {e.strerror}") from None
    return os.environ.get(env, "").strip()
