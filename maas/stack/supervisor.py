"""`maas up`: one foreground command for a whole local stack.

Starts etcd and nats-server (unless URLs are given), then registry, two schedulers (leader
and standby), router and N workers as separate processes (restarted when they exit), forges and registers the demo model (or registers
--model), deploys it, prints the endpoints, and on SIGINT/SIGTERM stops everything it
started, newest first. `.maas/stack.json` lets CLI commands run in the same directory
find the stack without flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from maas.cli.commands import deployments_ready
from maas.mesh.aio import wait_event
from maas.mesh.auth import new_key
from maas.mesh.clients import MeshClient, live_services
from maas.mesh.config import redact
from maas.mesh.errors import StartupError
from maas.mesh.tls import TlsFiles, issue, local_hosts, make_ca
from maas.services.registry.apikeys import install_admin_token, install_service_keys
from maas.services.worker.extra import has_worker_extra, worker_extra_hint
from maas.stack.servers import Child, port_in_use, start_etcd, start_nats
from maas.v1 import registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

STACK_FILE = "stack.json"
SERVICES = ("registry", "scheduler", "router")


@dataclass(frozen=True)
class UpConfig:
    data_dir: Path
    workers: int = 1
    model: str = ""          # source to serve; "" forges the demo model
    model_name: str = "demo"
    model_format: str = "hf"
    model_options: tuple[tuple[str, str], ...] = ()  # engine options of the model (`maas up --option`)
    etcd: str = ""           # external etcd; "" starts one
    nats: str = ""           # external NATS; "" starts one
    router_port: int = 50051
    http_port: int = 8000    # the router's OpenAI-compatible HTTP API; -1: off
    worker_args: tuple[str, ...] = ()
    ready_timeout: float = 300.0
    insecure: bool = False   # every service trusts every caller (development only)

    @property
    def tls(self) -> bool:
        """TLS on every link the stack serves (all but an --insecure stack)."""
        return not self.insecure

    @property
    def http_url(self) -> str:
        """The OpenAI base URL of the router's HTTP API ("" when it is off)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}/v1" if self.http_port >= 0 else ""


RESTART_MAX_DELAY = 30.0  # seconds between restarts of a process that keeps dying
RESTART_RESET = 60.0      # up this long: its next exit restarts at once again


@dataclass
class Restart:
    delay: float = 0.0
    due: float = 0.0
    started: float = 0.0


@dataclass
class Stack:
    config: UpConfig
    children: list[Child] = field(default_factory=list)
    etcd: str = ""
    nats: str = ""

    def _say(self, msg: str) -> None:
        print(msg, flush=True)

    def start_servers(self) -> None:
        cfg, logs = self.config, self.config.data_dir / "logs"
        if port_in_use(cfg.router_port):
            raise StartupError(f"router port {cfg.router_port} on 127.0.0.1 is already in use "
                               "(another `maas up`?); pass --router-port")
        if cfg.http_port >= 0 and port_in_use(cfg.http_port):
            raise StartupError(f"router HTTP port {cfg.http_port} on 127.0.0.1 is already in use "
                               "(another `maas up`?); pass --http-port (-1: no HTTP API)")
        if cfg.etcd:
            self.etcd = cfg.etcd
        else:
            password = "" if cfg.insecure else self.secret("etcd-password")
            child, self.etcd = start_etcd(cfg.data_dir / "etcd", log_dir=logs, password=password)
            self.children.append(child)
        if cfg.nats:
            self.nats = cfg.nats
        else:
            token = "" if cfg.insecure else self.secret("nats-token")
            child, self.nats = start_nats(cfg.data_dir / "nats", log_dir=logs, token=token)
            self.children.append(child)
        self._say(f"etcd {redact(self.etcd)}   nats {redact(self.nats)}")

    def _service(self, kind: str, *extra: str) -> Child:
        n = sum(c.name.startswith(kind) for c in self.children)
        name = f"{kind}-{n}" if kind in ("worker", "scheduler") else kind
        security = ("--insecure",) if self.config.insecure else (
            "--credential-file", str(self.credential(kind)), *self.tls_args(kind))
        args = [sys.executable, "-m", "maas", kind, *security, *extra]
        # not on the command line, where any local user could read them: the URLs carry credentials
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MAAS_ETCD": self.etcd, "MAAS_NATS": self.nats}
        child = Child(name, args, self.config.data_dir / "logs" / f"{name}.log", env=env).start()
        self.children.append(child)
        return child

    def admin_token(self) -> Path:
        """The platform admin's credential for this data directory (made once, owner-only)."""
        self.secret("admin-token")
        return self.config.data_dir / "admin-token"

    def secret(self, name: str) -> str:
        """A random secret kept in the data directory (made once, owner-only)."""
        path = self.config.data_dir / name
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(32) + "\n")
        return path.read_text().strip()

    def credential(self, kind: str) -> Path:
        """A service kind's key file in this data directory (made once, owner-only); every
        instance of the kind presents it (see install_credentials)."""
        path = self.config.data_dir / "credentials" / f"{kind}.key"
        if not path.exists():
            path.parent.mkdir(mode=0o700, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(new_key()[0] + "\n")
        return path

    @property
    def tls_dir(self) -> Path:
        return self.config.data_dir / "tls"

    def tls_args(self, kind: str) -> tuple[str, ...]:
        """A kind's TLS flags: its certificate for this host, and the stack's CA (made once)."""
        if not self.config.tls:
            return ()
        make_ca(self.tls_dir)
        cert, key = issue(self.tls_dir, kind, local_hosts())
        return ("--tls-ca", str(self.tls_dir / "ca.pem"), "--tls-cert", str(cert), "--tls-key", str(key))

    def client_tls(self) -> TlsFiles | None:
        return TlsFiles.load(ca=str(self.tls_dir / "ca.pem")) if self.config.tls else None

    async def install_credentials(self) -> None:
        """Put the admin token's and the services' key records into etcd (hashes only), before
        any service starts: a local stack's operator holds its etcd, as an operator would make
        them with `maas keys create --service KIND` and a Secret per service in a cluster."""
        if self.config.insecure:
            return
        for kind in (*SERVICES, "worker"):
            self.credential(kind)
        async with MeshClient(self.etcd) as mesh:
            await install_admin_token(mesh.etcd, mesh.keys, self.admin_token().read_text().strip())
            await install_service_keys(mesh.etcd, mesh.keys, self.config.data_dir / "credentials")

    def start_services(self) -> None:
        self._service("registry", "--blob-dir", str(self.config.data_dir / "blobs"),
                      "--admin-token-file", str(self.admin_token()))
        self._service("scheduler")
        self._service("scheduler")  # a standby: takes over within the lease TTL if the leader dies
        self._service("router", "--port", str(self.config.router_port), "--http-port", str(self.config.http_port))
        for _ in range(self.config.workers):
            self._service("worker", *self._torch_threads(), *self.config.worker_args)

    def _torch_threads(self) -> tuple[str, ...]:
        """Split this host's cores among the workers' engines, less one core for everything
        else here (the router, the workers' gRPC side, the clients), unless MAAS_TORCH_THREADS
        or --torch-threads says otherwise. Engines that each use every core fight each other;
        one that takes the last core too spins its threads against the router and the
        clients (bench/README.md: on 2 cores, 1 thread streamed 1.4-1.6x faster than 2)."""
        if os.environ.get("MAAS_TORCH_THREADS") or "--torch-threads" in self.config.worker_args:
            return ()
        cores = len(os.sched_getaffinity(0))
        return ("--torch-threads", str(max(1, (cores - 1) // self.config.workers)))

    def write_stack_file(self, api_key: str = "") -> None:
        """`.maas/stack.json`: how CLI commands run here find the stack, and the credentials
        they send (owner-only, like the token files)."""
        doc = {"etcd": self.etcd, "nats": self.nats, "router": f"127.0.0.1:{self.config.router_port}",
               "http": self.config.http_url,
               "deployments": [self.config.model_name], "pid": os.getpid(), "started": time.time(),
               "admin_token": self.admin_token().read_text().strip(), "api_key": api_key,
               "tls_ca": str(self.tls_dir / "ca.pem") if self.config.tls else ""}
        path = self.config.data_dir / STACK_FILE
        path.touch(mode=0o600)
        path.write_text(json.dumps(doc, indent=2))

    def check_children(self) -> None:
        for c in self.children:
            if not c.alive:
                raise StartupError(f"{c.name} exited during start-up (log {c.log_path}):\n{c.tail()}")

    def restart_dead(self, restarts: dict[str, Restart], now: float) -> None:
        """Start again any process that exited (killed, crashed): a local stack heals like a
        supervised deployment would. Back-off doubles (1 s to 30 s) while it keeps dying."""
        for c in self.children:
            if c.alive:
                continue
            r = restarts.setdefault(c.name, Restart())
            if r.due == 0.0:  # just found dead
                code = c.proc.returncode if c.proc is not None else None
                r.delay = 1.0 if not r.delay or now - r.started > RESTART_RESET else min(r.delay * 2, RESTART_MAX_DELAY)
                r.due = now + r.delay
                print(f"warning: {c.name} exited ({code}); restarting in {r.delay:.0f}s (log {c.log_path})",
                      file=sys.stderr, flush=True)
            elif now >= r.due:
                c.stop(timeout=0)  # close its log
                c.start()
                r.due, r.started = 0.0, now
                print(f"restarted {c.name}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Stop services newest first (workers drain), then NATS and etcd."""
        services = [c for c in self.children if c.name not in ("etcd", "nats-server")]
        for c in reversed(services):
            c.signal(signal.SIGTERM)
        for c in reversed(services):
            c.stop(timeout=15)
        for c in reversed([c for c in self.children if c not in services]):
            c.stop(timeout=10)
        with contextlib.suppress(OSError):
            (self.config.data_dir / STACK_FILE).unlink()


async def _wait_services(mesh: MeshClient, stack: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    kinds = (*SERVICES, "worker")
    while time.monotonic() < deadline:
        stack.check_children()
        with contextlib.suppress(Exception):
            found = {k: len(await live_services(mesh.etcd, mesh.keys, k)) for k in kinds}
            if all(found[k] for k in SERVICES) and found["worker"] >= stack.config.workers:
                return
        await asyncio.sleep(0.2)
    raise StartupError("services did not register in etcd in time; see the logs in " +
                       str(stack.config.data_dir / "logs"))


async def register_and_deploy(mesh: MeshClient, name: str, source: str, fmt: str, replicas: int = 1,
                              options: dict[str, str] | None = None) -> str:
    """Register `source` as `name` (with engine `options`) unless its latest version already
    is that source (with those options, when some are given); deploy it."""
    options = options or {}
    registry = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
    scheduler = scheduler_pb2_grpc.SchedulerStub(await mesh.channel("scheduler"))
    version = None
    with contextlib.suppress(grpc.aio.AioRpcError):
        latest = await registry.GetVersion(registry_pb2.GetVersionRequest(ref=name), timeout=10)
        # the registry keeps a local source's resolved path (a symlinked model dir)
        same = latest.source in (str(source), str(Path(source).resolve()) if Path(source).exists() else "")
        if same and latest.format == fmt and (not options or dict(latest.options) == options):
            version = latest
    if version is None:
        version = await registry.RegisterModel(
            registry_pb2.RegisterModelRequest(name=name, source=str(source), format=fmt, options=options),
            timeout=30)
    ref = f"{version.name}@{version.version}"
    dep = scheduler_pb2.Deployment(name=name, model=ref, replicas=replicas)
    try:
        await scheduler.CreateDeployment(scheduler_pb2.CreateDeploymentRequest(deployment=dep), timeout=10)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        current = (await scheduler.GetDeployment(scheduler_pb2.GetDeploymentRequest(name=name), timeout=10)).deployment
        if current.resolved_version != ref:  # keep what else it has (replicas, adapters of this version)
            current.model = ref
            del current.adapters[:]  # adapters of the old version cannot follow it
            await scheduler.UpdateDeployment(scheduler_pb2.UpdateDeploymentRequest(deployment=current), timeout=10)
    return ref


async def development_key(mesh: MeshClient, data_dir: Path) -> str:
    """The development key of this data directory (a developer key of tenant `dev`): the
    saved one while the mesh still knows it, else a new one."""
    registry = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
    path = data_dir / "dev-api-key"
    if path.exists():
        key = path.read_text().strip()
        known = await registry.ListKeys(registry_pb2.ListKeysRequest(tenant="dev"), timeout=10)
        if any(k.id == key.split("_")[1] and k.role == "developer" for k in known.keys):
            return key
    created = await registry.CreateKey(registry_pb2.CreateKeyRequest(tenant="dev", role="developer"), timeout=10)
    path.touch(mode=0o600)
    path.write_text(created.key + "\n")
    return created.key


async def _deployments_ready(mesh: MeshClient, names: list[str]) -> tuple[bool, str]:
    scheduler = scheduler_pb2_grpc.SchedulerStub(await mesh.channel("scheduler"))
    listing = await scheduler.ListDeployments(scheduler_pb2.ListDeploymentsRequest(), timeout=5)
    return deployments_ready(list(listing.deployments), names, only_expected=True)


def _forge_in_background(dest: Path) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def run() -> None:
        try:
            from maas.models.forge import forge_demo_model

            result.append(forge_demo_model(dest))
        except Exception as e:  # reported by the caller
            result.append(e)

    thread = threading.Thread(target=run, name="forge", daemon=True)
    thread.start()
    return thread, result


async def _up(stack: Stack, stop: asyncio.Event) -> None:
    cfg = stack.config
    started = time.monotonic()
    if (not cfg.model or cfg.model_format == "hf") and not has_worker_extra():
        what = "the demo model" if not cfg.model else f"{cfg.model} (format hf)"
        raise StartupError(worker_extra_hint(f"serving {what}"))
    forge = None
    if not cfg.model:
        demo = cfg.data_dir / "models" / "demo"
        if not demo.exists():
            print(f"forging the demo model into {demo} (first start only; ~30 s on 2 cores)", flush=True)
        forge = _forge_in_background(demo)
    stack.start_servers()
    stack.write_stack_file()  # from here on `maas status --wait` in this directory finds the stack
    await stack.install_credentials()
    stack.start_services()
    if cfg.insecure:
        print("warning: --insecure: no service checks a credential; anyone who reaches a port is the admin",
              file=sys.stderr, flush=True)
    async with MeshClient(stack.etcd, credential=stack.admin_token().read_text().strip(),
                          tls=stack.client_tls()) as mesh:
        await _wait_services(mesh, stack, 60)
        source, fmt = cfg.model, cfg.model_format
        if forge is not None:
            thread, result = forge
            while thread.is_alive():
                await asyncio.sleep(0.1)
            if isinstance(result[0], Exception):
                raise StartupError(f"forging the demo model failed: {result[0]}")
            source = str(result[0])
        elif fmt == "hf" and Path(source).expanduser().is_dir():
            source = str(Path(source).expanduser().resolve())
        ref = await register_and_deploy(mesh, cfg.model_name, source, fmt, options=dict(cfg.model_options))
        api_key = await development_key(mesh, cfg.data_dir)
        stack.write_stack_file(api_key)
        deadline = time.monotonic() + cfg.ready_timeout
        while True:
            stack.check_children()
            ok, why = await _deployments_ready(mesh, [cfg.model_name])
            if ok:
                break
            if time.monotonic() > deadline:
                raise StartupError(f"{ref} did not become ready in {cfg.ready_timeout:.0f}s: {why}")
            await asyncio.sleep(0.2)
    took = time.monotonic() - started
    http = f"\n  router HTTP   {cfg.http_url}  (OpenAI base URL)" if cfg.http_url else ""
    tls = (f"\n  TLS CA        {stack.tls_dir / 'ca.pem'}  (clients verify the stack with it: SSL_CERT_FILE, MAAS_TLS_CA)"
           if cfg.tls else "")
    print(f"""
maas-mesh is up ({took:.1f}s): {ref} ready on {cfg.workers} worker(s)
  router gRPC   127.0.0.1:{cfg.router_port}{http}
  API key       {api_key}  (tenant dev, developer)
  admin token   {cfg.data_dir / 'admin-token'}  (`maas` commands here act as the admin){tls}
  etcd          {redact(stack.etcd)}
  nats          {redact(stack.nats)}
  logs          {cfg.data_dir / 'logs'}

  try:  maas generate --model {cfg.model_name} "def add(a, b):"
        maas status    maas events --follow
Ctrl-C stops everything.""", flush=True)
    restarts: dict[str, Restart] = {}
    while not stop.is_set():
        await wait_event(stop, 1.0)
        if not stop.is_set():
            stack.restart_dead(restarts, time.monotonic())


def run_up(cfg: UpConfig) -> int:
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(cfg)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        up = asyncio.create_task(_up(stack, stop))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({up, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if up in done:
            up.result()
        else:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await up

    try:
        asyncio.run(main())
        return 0
    except StartupError as e:
        print(f"maas up: {e}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as e:
        print(f"maas up: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        stack.stop()
        print("stopped", file=sys.stderr, flush=True)
