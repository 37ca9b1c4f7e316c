"""Benchmark: what the router costs, against the same calls sent straight to a worker.

Real etcd and nats-server (from the pip wheels) run in a temporary directory; a registry,
a scheduler, a router and N workers (default 2) run as separate processes
(`python -m maas <kind>`), as in production, so the load generator (this process), the
router and the workers each have their own event loop and GIL. The mesh is secure as
`maas up` makes it (docs/security.md): the bench makes an admin token, a service key per
kind and a CA with a certificate per kind in its temporary directory, installs the keys'
records in etcd before any service starts, and starts each service with its
--credential-file and --tls-ca/--tls-cert/--tls-key (the registry with --admin-token-file).
The bench talks to the registry and the scheduler as the admin, creates a tenant's
inference key through the registry (`CreateKey(tenant="bench", role="inference")`) and
sends it on every call through the router; on the direct calls to a worker it plays the
router and sends the router's service key. Every channel verifies the services' TLS
against the CA, and every call passes its key as metadata itself (no channel
interceptor), so the client pays what any client does. The unary and streaming
models are `sim` (words instead of a model, a fixed delay per token), so model compute does
not hide the router; the prefix part uses the real engine:

  bench-fast    token_delay_ms=0, 1 replica: the worker answers at once (unary overhead)
  bench-stream  token_delay_ms=--stream-delay-ms (0), one replica per worker (streaming)
  bench-prefix  the forged demo model (format hf, the directory tests/conftest.py's
                demo_model_dir uses; forged only if missing), prefix_cache_mb=1024, one
                replica per worker; the workers run with --torch-threads = CPUs / workers
                (with torch's default, every CPU in each worker, two engines sharing two
                cores ran about 25 times slower); a second router, --no-prefix-affinity,
                is its baseline

Then, each against a baseline measured in the same run:

  unary      the same Generate calls (max_tokens 2) sent directly to the worker (with the
             `x-maas-replica` header naming the replica, as the router sends it) and through
             the router, at each level of --concurrency (1 and 64); rounds alternate
             direct and router. Per-request latency (p50, p90) and requests/s.
  streaming  --streams (256) concurrent GenerateStream calls of --tokens (300) tokens each
             (greedy, ignore_eos), spread over the replicas directly, and through the
             router. Tokens/s received by the client (token ids counted, not chunks),
             chunks/s and tokens per chunk (coalescing shows there); every routed stream
             is checked against the direct one for the same prompt (nothing dropped or
             reordered).
  prefix     time to first token with shared system prompts on the real engine, through
             the router (routed by prompt prefix) and through the second router (least
             load). Each phase: --prefix-requests (128) GenerateStream calls (a system
             message of 1,250-1,400 characters, about 600 tokens, and a short question of
             its own; max_tokens 4, greedy) at --prefix-concurrency (8), over
             --prefix-prompts (4) system prompts that no earlier phase used, so no phase
             finds another's prefixes in cache; 2 rounds, ABBA. TTFT p50/p90 (to the first
             chunk with tokens), the prompt tokens served from the prefix cache
             (cached_prompt_tokens / prompt_tokens from the last chunk's usage), requests
             that found nothing cached, distinct replicas per system prompt, and TTFT of
             cached vs uncached requests.
  security   what authentication and TLS cost. A second mesh runs in the same etcd and
             NATS under its own prefix, idle until this phase: its own registry,
             scheduler, router and as many workers, every one with --insecure and no TLS,
             bench-fast and bench-stream deployed on it as on the secure one. The same
             loads go through each mesh's router: the streaming load (--streams x
             --tokens), then --requests unary Generate at the highest --concurrency; the
             secure mesh's calls carry the tenant's key, the insecure one's none.
             --security-rounds (4) rounds per mesh, alternating secure, insecure,
             insecure, secure, ... (ABBA), after an untimed warm-up of each. Per round and
             over all: tokens/s, TTFT p50/p90, requests/s, latency p50/p90, cores busy per
             process; then CPU per token and per request (router, and all processes shown),
             the per-round ratios (their spread is the noise) and secure / insecure overall.

Each row also shows where the CPU went: CPU seconds per process (this client, the router,
the workers) divided by the wall time, i.e. cores busy. The last line is machine-readable:

  router_overhead_ms=<a> router_vs_direct=<b> stream_tokens_s=<c> prefix_ttft_speedup=<d>
  auth_tls_stream_ratio=<e> auth_tls_unary_ratio=<f>   (one line)

a = p50(router) - p50(direct) at concurrency 1 (target under 0.5 ms); b = requests/s
through the router / requests/s direct at the highest concurrency (target at least 0.8);
c = tokens/s the client received through the router (target at least 50,000 on a 2-core
machine); d = TTFT p50 least-load / TTFT p50 affinity (above 1: affinity is faster);
e = tokens/s through the secure router / through the insecure one (the security phase's
streaming, all rounds; goal: above 0.9, i.e. authentication and TLS cost under 10%);
f = the same for unary requests/s. A figure that could not be measured prints as nan and
the exit status is 1; --no-prefix skips the prefix part (d prints as nan, and does not
count), --no-security the security phase and the insecure mesh (e and f print as nan, and
do not count).

    python bench/router.py                      # 2,000 requests per row, 256 streams x 300 tokens
    python bench/router.py --quick              # small sizes, a quick check (32 prefix requests per phase)
    python bench/router.py --no-prefix          # without the prefix part (no hf model, no second router)
    python bench/router.py --no-security        # without the security phase (no insecure mesh)
    python bench/router.py --security-rounds 8  # a longer A/B of authentication and TLS
    python bench/router.py --py-spy /tmp/prof   # sample the routers (and workers) with py-spy
    python bench/router.py --profile-router /tmp/router.prof   # cProfile the router process
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import pstats
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from maas.mesh.auth import new_key
from maas.mesh.clients import REPLICA_HEADER, MeshClient, credential_metadata, dial, live_services
from maas.mesh.errors import MaasError
from maas.mesh.tls import TlsFiles, issue, make_ca
from maas.services.registry.apikeys import install_admin_token, put_key
from maas.stack.servers import Child, start_etcd, start_nats
from maas.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    mesh_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

FAST, STREAM, PREFIX = "bench-fast", "bench-stream", "bench-prefix"
ROUTER_NAMES = {"affinity": "router", "least-load": "router-lb"}  # prefix part: path -> process
PREFIX_ROUNDS = 2  # prefix phases per router, alternating (ABBA)
KV_CACHE_MB = 512  # the hf engine's default KV budget on CPU
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROUNDS = 2  # unary rounds per level, alternating direct and router
CALL_TIMEOUT = 60.0
SERVICE_KINDS = ("registry", "scheduler", "router", "worker")
TLS_HOSTS = ["127.0.0.1", "localhost"]  # services bind and advertise 127.0.0.1
# the children get every setting as a flag; none of these may leak in from this environment
SECURITY_ENV = ("MAAS_INSECURE", "MAAS_CREDENTIAL", "MAAS_CREDENTIAL_FILE", "MAAS_TLS_CA", "MAAS_TLS_CERT",
                "MAAS_TLS_KEY", "MAAS_ADMIN_TOKEN", "MAAS_SERVICE_KEYS_DIR")
Metadata = tuple[tuple[str, str], ...]


class Stop:
    """Set by SIGINT/SIGTERM; besides cancelling the main task, waits check it."""

    requested = False

    @classmethod
    def check(cls) -> None:
        if cls.requested:
            raise asyncio.CancelledError


def sig(x: float, fmt: str = ".3g") -> str:
    return "nan" if math.isnan(x) else format(x, fmt)


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


# -- processes -----------------------------------------------------------------------------


def cpu_seconds(pid: int | None, *, loop_only: bool = False) -> float:
    """User + system CPU seconds of a process (None: this one): all its threads, or only
    its main thread, the one that runs the asyncio event loop (gRPC's poller thread and
    the default executor are the others)."""
    pid = os.getpid() if pid is None else pid
    path = f"/proc/{pid}/task/{pid}/stat" if loop_only else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # owner-only from the start
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


@dataclass
class Security:
    """A secure mesh's credentials, as `maas up` makes them, in the bench's temporary
    directory: the admin token, one service key per kind, a CA and a certificate per kind
    for 127.0.0.1 and localhost (maas/stack/supervisor.py: credential(), tls_args())."""

    directory: Path
    admin_token: str
    service_keys: dict[str, str]

    @classmethod
    def make(cls, directory: Path) -> Security:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        sec = cls(directory, new_key()[0], {kind: new_key()[0] for kind in SERVICE_KINDS})
        _write_secret(directory / "admin-token", sec.admin_token)
        for kind, key in sec.service_keys.items():
            _write_secret(directory / f"{kind}.key", key)
        make_ca(sec.tls_dir)
        for kind in SERVICE_KINDS:
            issue(sec.tls_dir, kind, TLS_HOSTS)
        return sec

    @property
    def tls_dir(self) -> Path:
        return self.directory / "tls"

    def tls(self) -> TlsFiles:
        """What a client needs to verify the services: the CA."""
        return TlsFiles(ca=(self.tls_dir / "ca.pem").read_bytes())

    def flags(self, kind: str) -> list[str]:
        """A service's key and TLS flags (and the registry's admin token), as `maas up` gives them."""
        tls = self.tls_dir
        out = ["--credential-file", str(self.directory / f"{kind}.key"), "--tls-ca", str(tls / "ca.pem"),
               "--tls-cert", str(tls / f"{kind}.pem"), "--tls-key", str(tls / f"{kind}-key.pem")]
        if kind == "registry":
            out += ["--admin-token-file", str(self.directory / "admin-token")]
        return out

    async def install(self, etcd: str, prefix: str) -> None:
        """The admin token's and the service keys' records (hashes) into etcd, before any
        service starts (maas/stack/supervisor.py: install_credentials)."""
        async with MeshClient(etcd, prefix) as m:
            await install_admin_token(m.etcd, m.keys, self.admin_token)
            for kind, key in self.service_keys.items():
                await put_key(m.etcd, m.keys, key, registry_pb2.ApiKey(
                    id=f"svc-{kind}", service=kind, created_ms=int(time.time() * 1000)))


@dataclass
class Mesh:
    """One mesh under its own etcd prefix: secure (service keys and TLS on every link, the
    registry holding the admin token) when `security` is given, else every service runs
    with --insecure and no TLS. Its services' files (logs, blobs, caches) go under `home`."""

    etcd: str
    nats: str
    prefix: str
    home: Path
    log_level: str
    security: Security | None = None
    instance_prefix: str = "bench-"  # instance ids: bench-router, bench-w0, ...
    children: list[Child] = field(default_factory=list)
    named: dict[str, Child] = field(default_factory=dict)
    client_metadata: Metadata = ()  # what a client sends the router: a tenant's inference key (secure)

    @property
    def label(self) -> str:
        return "secure" if self.security else "insecure"

    @property
    def tls(self) -> TlsFiles | None:
        return self.security.tls() if self.security else None

    def instance(self, name: str) -> str:
        return f"{self.instance_prefix}{name}"

    def worker_name(self, worker_id: str) -> str:
        """The process name (w0, w1, ...) of a worker instance id."""
        return worker_id.removeprefix(self.instance_prefix)

    def service_metadata(self, kind: str) -> Metadata:
        """What a call made as the service `kind` carries: its key (secure), else nothing."""
        return credential_metadata(self.security.service_keys[kind]) if self.security else ()

    def admin_client(self) -> MeshClient:
        """Registry, scheduler and etcd lookups as the admin, verifying the services' TLS."""
        if self.security is None:
            return MeshClient(self.etcd, self.prefix)
        return MeshClient(self.etcd, self.prefix, credential=self.security.admin_token, tls=self.tls)

    def dial(self, endpoint: str) -> grpc.aio.Channel:
        """A channel with no credential of its own (calls pass their metadata explicitly, so
        the client pays what any client does), over TLS on a secure mesh."""
        return dial(endpoint, tls=self.tls)

    def spawn(self, name: str, kind: str, *args: str, profile: str = "", env: dict[str, str] | None = None
              ) -> Child:
        cmd = [sys.executable]
        if profile:
            cmd += ["-m", "cProfile", "-o", profile]
        security = self.security.flags(kind) if self.security else ["--insecure"]
        cmd += ["-m", "maas", kind, "--etcd", self.etcd, "--nats", self.nats, "--prefix", self.prefix,
                "--lease-ttl", "10", "--metrics-port", "-1", "--grace", "1", "--log-level", self.log_level,
                *security, *args]
        base = {k: v for k, v in os.environ.items() if k not in SECURITY_ENV}
        child = Child(name, cmd, self.home / "logs" / f"{name}.log",
                      env={**base, "PYTHONUNBUFFERED": "1", **(env or {})}).start()
        self.children.append(child)
        self.named[name] = child
        return child

    def check_alive(self) -> None:
        for c in self.children:
            if not c.alive:
                raise RuntimeError(f"{self.label} mesh: {c.name} exited (log {c.log_path}):\n{c.tail()}")

    def pids(self) -> dict[str, int | None]:
        """The processes whose CPU time is shown: this client, the router, the workers."""
        out: dict[str, int | None] = {"client": None}
        for name, c in self.named.items():
            if (name == "router" or name.startswith("w")) and c.proc is not None:
                out[name] = c.proc.pid
        return out

    def stop(self) -> None:
        for c in reversed(self.children):  # all at once, then wait for each
            c.signal(signal.SIGTERM)
        for c in reversed(self.children):
            c.stop(timeout=15)


def leftovers(*markers: str) -> list[str]:
    """Processes still running whose command line names one of `markers` (the bench's own
    etcd prefix and temporary directory, so nothing else can match)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(m in cmd for m in markers):
                found.append(f"{d.name}: {cmd[:120]}")
    return found


class Cpu:
    """CPU time per process over a phase, as cores busy: the whole process and (after the
    slash) its event-loop thread alone; a loop thread near 1.00 is that process's limit."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.start = {n: self._read(p) for n, p in pids.items()}
        self.t0 = time.perf_counter()
        self.used: dict[str, tuple[float, float]] = {}
        self.wall = math.nan

    @staticmethod
    def _read(pid: int | None) -> tuple[float, float]:
        return cpu_seconds(pid), cpu_seconds(pid, loop_only=True)

    def stop(self) -> Cpu:
        self.wall = time.perf_counter() - self.t0
        for n, p in self.pids.items():
            (t0, l0), (t1, l1) = self.start[n], self._read(p)
            self.used[n] = (t1 - t0, l1 - l0)
        return self

    @staticmethod
    def merge(parts: list[Cpu]) -> Cpu:
        out = Cpu({})
        out.wall = sum(p.wall for p in parts)
        for p in parts:
            for n, (t, lo) in p.used.items():
                t0, l0 = out.used.get(n, (0.0, 0.0))
                out.used[n] = (t0 + t, l0 + lo)
        return out

    def cores(self) -> str:
        busy = " ".join(f"{n} {t / self.wall:.2f}/{lo / self.wall:.2f}" for n, (t, lo) in self.used.items()
                        if t / self.wall >= 0.005)
        return f"{busy} (sum {sum(t for t, _ in self.used.values()) / self.wall:.2f})"


class PySpy:
    """py-spy record on some processes during a phase; prints the functions that took the
    most samples (own time, Python frames; --native adds C frames)."""

    def __init__(self, exe: str, out_dir: Path, rate: int, native: bool) -> None:
        self.exe, self.out_dir, self.rate, self.native = exe, out_dir, rate, native
        self.running: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def start(self, label: str, pids: dict[str, int]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            out = self.out_dir / f"{label}-{name}.txt"
            # --native (C frames: gRPC's core, protobuf) needs to pause the process to unwind
            cmd = [self.exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
                   "--output", str(out), *(["--native"] if self.native else ["--nonblocking"])]
            with open(out.with_suffix(".log"), "wb") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.running.append((name, out, proc))

    def stop(self, top: int = 14) -> None:
        for _, _, proc in self.running:
            proc.send_signal(signal.SIGINT)
        for name, out, proc in self.running:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            summarize_stacks(name, out, top)
        self.running.clear()

    def kill(self) -> None:
        for _, _, proc in self.running:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.running.clear()


def _frame(frame: str) -> str:
    """'name (path/to/file.py:12)' -> 'name (file.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})" if short else name


def _category(leaf: str) -> str:
    """Who a sample's own time belongs to, from its innermost Python frame. Without
    --native, C and Cython code shows as the Python frame that called it: gRPC's Cython
    callbacks run under asyncio's Handle._run, and its poller thread (the gRPC core's
    I/O and HTTP/2 work) as Thread.run."""
    if leaf.startswith(("Handle._run ", "Thread.run ")) or "grpc" in leaf:
        return "grpc"
    if "maas/" in leaf or "router/" in leaf or "worker/" in leaf or "engines/" in leaf or "mesh/" in leaf:
        return "maas"
    if "prometheus_client" in leaf:
        return "metrics"
    if "asyncio/" in leaf or "selectors" in leaf:
        return "asyncio"
    if "protobuf" in leaf or "_pb2" in leaf:
        return "protobuf"
    return "other"


def summarize_stacks(name: str, path: Path, top: int) -> None:
    own: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        print(f"    py-spy {name}: no samples ({path} missing; see {path.with_suffix('.log')})")
        return
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.split(";")[-1]
        own[_frame(leaf)] += n
        kinds[_category(leaf)] += n
    print(f"    py-spy {name}: {total} samples (raw stacks in {path}); own time by kind: "
          + ", ".join(f"{k} {v / max(1, total):.0%}" for k, v in kinds.most_common()) + "; most own time:")
    for frame, n in own.most_common(top):
        print(f"      {n / max(1, total):6.1%}  {frame}")


# -- setting up the mesh ---------------------------------------------------------------------


async def channel_to(client: MeshClient, mesh: Mesh, kind: str, timeout: float = 120.0) -> grpc.aio.Channel:
    deadline = time.monotonic() + timeout
    while True:
        Stop.check()
        mesh.check_alive()
        try:
            return await client.channel(kind)
        except MaasError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def router_channel(client: MeshClient, mesh: Mesh, instance: str,
                         timeout: float = 120.0) -> grpc.aio.Channel:
    """A channel to the router registered as `instance` (there may be two)."""
    deadline = time.monotonic() + timeout
    while True:
        Stop.check()
        mesh.check_alive()
        found = [s for s in await live_services(client.etcd, client.keys, "router") if s.instance == instance]
        if found:
            channel = mesh.dial(found[0].endpoint)
            await asyncio.wait_for(channel.channel_ready(), 10)
            return channel
        if time.monotonic() > deadline:
            raise RuntimeError(f"router {instance} not registered after {timeout:.0f}s")
        await asyncio.sleep(0.2)


FORGE = """import os
from pathlib import Path
from maas.models.forge import DEFAULT_STEPS, FORGE_VERSION, forge_demo_model
root = Path(os.environ.get("MAAS_TEST_CACHE") or Path.home() / ".cache" / "maas-mesh" / "test-models")
print(forge_demo_model(root / f"demo-v{FORGE_VERSION}-seed0-steps{DEFAULT_STEPS}", seed=0))
"""  # the directory tests/conftest.py's demo_model_dir uses: forged once, then reused


async def demo_model(timeout: float = 900.0) -> str:
    """The forged demo model's directory (forged, in a subprocess, only if not cached)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", FORGE, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode:
        raise RuntimeError(f"forging the demo model failed:\n{err.decode(errors='replace')[-2000:]}")
    return out.decode().strip().splitlines()[-1]


async def wait_workers(client: MeshClient, mesh: Mesh, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(await client.etcd.get_prefix(client.keys.workers())) < count:
        Stop.check()
        mesh.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} workers registered after {timeout:.0f}s")
        await asyncio.sleep(0.2)


async def deploy(registry: grpc.aio.Channel, scheduler: grpc.aio.Channel, name: str, replicas: int,
                 fmt: str = "sim", source: str = "", memory_bytes: int = 0, **options: str) -> None:
    await registry_pb2_grpc.RegistryStub(registry).RegisterModel(registry_pb2.RegisterModelRequest(
        name=name, format=fmt, source=source, task="generate", description="bench/router.py", options=options,
        resources=common_pb2.Resources(memory_bytes=memory_bytes)), timeout=10)
    await scheduler_pb2_grpc.SchedulerStub(scheduler).CreateDeployment(scheduler_pb2.CreateDeploymentRequest(
        deployment=scheduler_pb2.Deployment(name=name, model=name, replicas=replicas)), timeout=10)


async def wait_ready(client: MeshClient, mesh: Mesh, name: str, replicas: int,
                     timeout: float = 120.0) -> list[mesh_pb2.ReplicaInfo]:
    """The deployment's ready replicas, once there are `replicas` of them (read from etcd)."""
    deadline = time.monotonic() + timeout
    while True:
        Stop.check()
        mesh.check_alive()
        ready = []
        for kv in await client.etcd.get_prefix(client.keys.replicas()):
            info = mesh_pb2.ReplicaInfo.FromString(kv.value)
            if info.deployment == name and info.state == mesh_pb2.REPLICA_STATE_READY:
                ready.append(info)
        if len(ready) >= replicas:
            return sorted(ready, key=lambda r: r.worker_id)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: {len(ready)}/{replicas} replicas ready after {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def until_routed(router: inference_pb2_grpc.InferenceStub, model: str, metadata: Metadata,
                       timeout: float = 30.0) -> None:
    """Wait until the router's pool has the deployment and its key mirror the client's key
    (its etcd mirrors lag a little)."""
    deadline = time.monotonic() + timeout
    request = unary_request(model, 1)
    while True:
        Stop.check()
        try:
            await router.Generate(request, timeout=5, metadata=metadata)
            return
        except grpc.aio.AioRpcError as e:
            lag = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
            if e.code() not in lag or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# -- load ----------------------------------------------------------------------------------


def unary_request(model: str, max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(model=model, prompt="the quick brown fox",
                                         params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0))


@dataclass
class Unary:
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    wall: float = 0.0
    cpus: list[Cpu] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.wall if self.wall else math.nan


async def unary_load(call: Callable[[], Awaitable[object]], total: int, concurrency: int, out: Unary) -> None:
    left = total

    async def loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t = time.perf_counter()
            await call()
            out.latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    out.wall += time.perf_counter() - start
    out.requests += total


@dataclass
class Streams:
    tokens: list[list[int]]
    chunks: int
    wall: float
    first_token: list[float]
    cpu: Cpu

    @property
    def total_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_s(self) -> float:
        return self.total_tokens / self.wall if self.wall else math.nan


def stream_request(i: int, tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=STREAM, prompt=f"stream {i} of the router benchmark",
        params=common_pb2.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))


async def stream_load(targets: list[tuple[inference_pb2_grpc.InferenceStub, Metadata]],
                      streams: int, tokens: int, pids: dict[str, int | None]) -> Streams:
    """`streams` concurrent GenerateStream calls, stream i on targets[i % len(targets)]."""
    got: list[list[int]] = [[] for _ in range(streams)]
    first: list[float] = []
    chunks = 0

    async def one(i: int) -> None:
        nonlocal chunks
        stub, metadata = targets[i % len(targets)]
        call = stub.GenerateStream(stream_request(i, tokens), timeout=CALL_TIMEOUT, metadata=metadata)
        out = got[i]
        t0 = time.perf_counter()
        n = 0
        while (msg := await call.read()) is not grpc.aio.EOF:
            n += 1
            if not out and msg.token_ids:
                first.append(time.perf_counter() - t0)
            out.extend(msg.token_ids)
        chunks += n

    cpu = Cpu(pids)
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - start
    return Streams(got, chunks, wall, first, cpu.stop())


# -- the phases ----------------------------------------------------------------------------


async def bench_unary(args: argparse.Namespace, mesh: Mesh, router: inference_pb2_grpc.InferenceStub,
                      replica: mesh_pb2.ReplicaInfo, spy: PySpy | None) -> tuple[float, float]:
    direct_channel = mesh.dial(replica.endpoint)
    try:
        direct = inference_pb2_grpc.InferenceStub(direct_channel)
        request = unary_request(FAST, args.max_tokens)
        # direct: the bench plays the router (the replica header, the router's service key)
        header = ((REPLICA_HEADER, replica.replica_id), *mesh.service_metadata("router"))
        routed = mesh.client_metadata  # a tenant's inference key
        paths: dict[str, Callable[[], Awaitable[object]]] = {
            "direct": lambda: direct.Generate(request, timeout=CALL_TIMEOUT, metadata=header),
            "router": lambda: router.Generate(request, timeout=CALL_TIMEOUT, metadata=routed),
        }
        for call in paths.values():  # warm up: connections, code paths
            await unary_load(call, max(50, args.requests // 10), 8, Unary())
        worker = mesh.worker_name(replica.worker_id)
        pids = {n: p for n, p in mesh.pids().items() if n in ("client", "router", worker)}
        print(f"\nunary Generate of {FAST} (sim, token_delay_ms=0) on {replica.worker_id}, max_tokens="
              f"{args.max_tokens}, {args.requests} requests per row in {ROUNDS} rounds alternating direct and "
              f"router; cpu = cores busy, process/event-loop thread")
        print(f"{'concurrent':>10} {'path':>7} {'p50 ms':>8} {'p90 ms':>8} {'req/s':>8}   cpu")
        rows: dict[tuple[int, str], Unary] = {}
        for level in args.levels:
            results = {p: Unary() for p in paths}
            profile_now = spy is not None and level == max(args.levels)
            for r in range(ROUNDS):
                for path, call in paths.items():
                    Stop.check()
                    share = args.requests // ROUNDS + (args.requests % ROUNDS if r == 0 else 0)
                    if profile_now and path == "router" and r == 0:
                        spy.start(f"unary{level}", {"router": pids["router"]})  # type: ignore[union-attr,dict-item]
                    cpu = Cpu(pids)
                    await unary_load(call, share, level, results[path])
                    results[path].cpus.append(cpu.stop())
                    if profile_now and path == "router" and r == 0:
                        print(f"  (py-spy: router, unary at concurrency {level})")
                        spy.stop()  # type: ignore[union-attr]
            for path, res in results.items():
                rows[(level, path)] = res
                print(f"{level:>10} {path:>7} {pct(res.latencies, 0.5) * 1e3:>8.3f} "
                      f"{pct(res.latencies, 0.9) * 1e3:>8.3f} {res.rate:>8.0f}   {Cpu.merge(res.cpus).cores()}")
        low, high = min(args.levels), max(args.levels)
        overhead = (pct(rows[(low, "router")].latencies, 0.5) - pct(rows[(low, "direct")].latencies, 0.5)) * 1e3
        ratio = rows[(high, "router")].rate / rows[(high, "direct")].rate
        for level in args.levels:
            dr, rr = rows[(level, "direct")], rows[(level, "router")]
            print(f"  at {level:>3}: router adds {(pct(rr.latencies, 0.5) - pct(dr.latencies, 0.5)) * 1e3:.3f} ms "
                  f"at p50, {(pct(rr.latencies, 0.9) - pct(dr.latencies, 0.9)) * 1e3:.3f} ms at p90; "
                  f"throughput {rr.rate / dr.rate:.2f}x direct")
        print(f"  router_overhead_ms (p50 added at {low}) {overhead:.3f} ms (target < 0.5); "
              f"router_vs_direct (req/s at {high}) {ratio:.2f}x (target >= 0.8)")
        return overhead, ratio
    finally:
        await direct_channel.close()


async def bench_streaming(args: argparse.Namespace, mesh: Mesh, router: inference_pb2_grpc.InferenceStub,
                          replicas: list[mesh_pb2.ReplicaInfo], spy: PySpy | None) -> float:
    channels = {r.endpoint: mesh.dial(r.endpoint) for r in replicas}
    try:
        as_router = mesh.service_metadata("router")  # direct: the bench plays the router
        direct: list[tuple[inference_pb2_grpc.InferenceStub, Metadata]] = [
            (inference_pb2_grpc.InferenceStub(channels[r.endpoint]), ((REPLICA_HEADER, r.replica_id), *as_router))
            for r in replicas]
        routed = [(router, mesh.client_metadata)]
        pids = mesh.pids()
        # warm up both paths (connections, code paths) with a few short streams
        await stream_load(direct, 16, 20, pids)
        await stream_load(routed, 16, 20, pids)

        n, t = args.streams, args.tokens
        print(f"\nstreaming: {n} concurrent GenerateStream of {STREAM} (sim, token_delay_ms={args.stream_delay_ms:g}), "
              f"{t} tokens each ({n * t:,} tokens), over {len(replicas)} replicas "
              f"({', '.join(r.worker_id for r in replicas)}); cpu = cores busy, process/event-loop thread")
        print(f"{'path':>7} {'wall s':>7} {'tokens/s':>9} {'chunks/s':>9} {'tok/chunk':>9} {'ttft p50':>9} "
              f"{'ttft p90':>9}   cpu")
        results: dict[str, Streams] = {}
        for path, targets in (("direct", direct), ("router", routed)):
            Stop.check()
            if spy is not None and path == "router":
                spy.start("stream", {k: v for k, v in pids.items() if v is not None})
            res = results[path] = await stream_load(targets, n, t, pids)
            print(f"{path:>7} {res.wall:>7.2f} {res.tokens_s:>9.0f} {res.chunks / res.wall:>9.0f} "
                  f"{res.total_tokens / max(1, res.chunks):>9.2f} {pct(res.first_token, 0.5) * 1e3:>7.1f}ms "
                  f"{pct(res.first_token, 0.9) * 1e3:>7.1f}ms   {res.cpu.cores()}")
            if spy is not None and path == "router":
                print("  (py-spy: every process but this client, streaming through the router)")
                spy.stop()
        d, r = results["direct"], results["router"]
        short = sum(len(x) != t for x in r.tokens)
        wrong = sum(a != b for a, b in zip(d.tokens, r.tokens, strict=True))
        print(f"  router: {r.tokens_s / d.tokens_s:.2f}x direct tokens/s; stream_tokens_s {r.tokens_s:,.0f} "
              f"(target >= 50,000)")
        if short or wrong:
            print(f"  ROUTED STREAMS DIFFER from direct: {short} of {n} not {t} tokens long, {wrong} not the "
                  "same tokens in the same order")
            return math.nan
        print(f"  every routed stream matches the direct one for its prompt ({t} tokens, same order)")
        return r.tokens_s
    finally:
        for ch in channels.values():
            await ch.close()


# -- prefix affinity -------------------------------------------------------------------------

# The system prompts: the customer-service assistant of an organisation (another one, or
# another branch of one, for each prompt: they differ from their first words on), then
# seven house rules drawn from a pool. The user turns: a question and a reference number.
ORGS = (
    ("Northbridge Rail", "a regional rail operator", "timetables, tickets, season passes, refunds, "
     "accessibility assistance and planned engineering works"),
    ("Harbour & Vale Building Society", "a mutual savings and mortgage lender", "savings accounts, mortgage "
     "applications, overpayments, branch opening hours and card security"),
    ("St Columba's Community Clinic", "an outpatient clinic", "appointments, repeat prescriptions, vaccination "
     "schedules, test results and how to reach the out-of-hours service"),
    ("Lumen Analytics", "a software company selling a data dashboard product", "plans and billing, single "
     "sign-on, data connectors, API limits and incident status"),
    ("Copperfield Mutual Insurance", "a home and motor insurer", "policy cover, claims, excess amounts, "
     "renewals, named drivers and windscreen repairs"),
    ("Aurora Skyways", "a short-haul airline", "bookings, baggage allowances, seat selection, check-in, "
     "delays and compensation"),
    ("Greenline Energy", "an electricity and gas supplier", "meter readings, tariffs, direct debits, smart "
     "meters, moving home and power cuts"),
    ("Kestrel University Library", "a university library", "borrowing, renewals, fines, inter-library loans, "
     "study-room bookings and access to electronic journals"),
    ("Meadowbrook Veterinary Practice", "a veterinary practice for small animals", "appointments, "
     "vaccinations, pet insurance forms, emergency care and repeat medication"),
    ("Tidewater Water Services", "a water utility", "bills, leaks, water quality notices, metering and "
     "planned supply interruptions"),
    ("Orchard Lane Grocers", "an online grocery delivery service", "delivery slots, substitutions, missing "
     "items, refunds, the loyalty scheme and allergens"),
    ("Pinecrest Property Management", "a residential letting agent", "rent payments, repairs, deposits, "
     "inspections, notice periods and tenancy renewals"),
    ("Brightwater Council", "a district council", "council tax, bin collections, parking permits, planning "
     "applications and library services"),
    ("Summit Outdoor Gear", "an outdoor clothing retailer", "orders, returns, sizing, warranty repairs, "
     "click-and-collect and gift cards"),
    ("Crescent Telecom", "a broadband and mobile provider", "outages, router setup, roaming, contract "
     "upgrades, number porting and bills"),
    ("Redwood Fitness Clubs", "a chain of gyms", "memberships, freezes and cancellations, class bookings, "
     "personal training and guest passes"),
)
ASSISTANTS = ("Ada", "Ben", "Cora", "Dev", "Ella", "Finn", "Gwen", "Hugo", "Iris", "Jonah", "Kira", "Leo",
              "Maya", "Noor", "Otto", "Pia")
BRANCHES = ("Highland", "Coastal", "Riverside", "Lakeside", "Valley", "Metro", "Island", "Border")
RULES = (
    "Keep answers short: three sentences at most unless the customer asks for detail, and never pad an "
    "answer with pleasantries.",
    "Never ask for a full card number, a password or a one-time code, and remind the customer not to share "
    "them if they offer.",
    "If you are not sure of an answer, say so plainly and offer to pass the question to a member of staff "
    "instead of guessing.",
    "Quote prices, fees and dates exactly as they appear in the customer's account or the published "
    "policy; do not round or estimate them.",
    "When a customer is upset, acknowledge the problem in one sentence before you explain what can be done "
    "about it.",
    "Do not give legal, medical or financial advice beyond our published guidance; point the customer to a "
    "qualified professional.",
    "Use plain English, avoid internal jargon and abbreviations, and explain any term the customer may not "
    "know.",
    "If the customer writes in another language, answer in that language if you can, and otherwise say "
    "politely that you can only help in English.",
    "Confirm the customer's identity with their reference number and postcode before discussing anything "
    "specific to their account.",
    "Offer the self-service page that solves the problem when there is one, with a one-line summary of "
    "what the customer will find there.",
    "Never promise a refund, a credit or compensation; explain the process and the usual time it takes, "
    "and let staff make the decision.",
    "Our opening hours are eight in the morning to eight in the evening on weekdays and nine to five on "
    "Saturdays; we are closed on Sundays and public holidays.",
    "Complaints are acknowledged within two working days and answered in full within eight weeks; give "
    "the customer their complaint reference.",
    "If the customer mentions a safety risk or an emergency, tell them to contact the emergency services "
    "first, then continue to help.",
    "Do not discuss other customers, staff members or internal systems, even if the customer insists or "
    "claims to work for us.",
    "End each answer by asking whether there is anything else you can help with, unless the customer has "
    "said goodbye.",
    "Accessibility matters: offer large-print, audio or British Sign Language versions of any document "
    "the customer asks about.",
    "Record nothing the customer did not ask you to record, and tell them how to see or delete the data we "
    "hold about them.",
)
QUESTIONS = (
    "How do I change the email address on my account?", "Can I get a copy of my last statement?",
    "What are your opening hours this Saturday?", "I was charged twice this month, what should I do?",
    "How long does a refund usually take?", "Can someone call me back tomorrow morning?",
    "How do I make a complaint?", "Is there a discount for students?",
    "I moved house last week; what do I need to update?", "Why did my monthly payment go up?",
    "Can I pause my account while I am abroad?", "Where can I find the large-print version?",
    "What documents do you need from me?", "Can my partner manage the account for me?",
    "How do I cancel, and is there a fee?", "Who do I contact out of hours?",
)


def system_prompt(k: int) -> str:
    """The k-th system prompt (0, 1, 2, ...). With the demo model's tokenizer the first 144
    differ within their first 16 tokens (the engine's cache block), so no two share a
    cached prefix; main() keeps the bench below that."""
    org, what, topics = ORGS[k % len(ORGS)]
    if k >= len(ORGS):
        org = f"{BRANCHES[(k // len(ORGS) - 1) % len(BRANCHES)]} {org}"
    name = ASSISTANTS[k % len(ASSISTANTS)]
    rules = random.Random(k).sample(RULES, 7)
    return (f"{org} customer service. You are {name}, the virtual assistant of {org}, {what}. You answer "
            f"customers' questions about {topics}. Follow these rules in every answer.\n"
            + "".join(f"{i}. {rule}\n" for i, rule in enumerate(rules, 1))
            + "Today's date and the customer's account details are given to you by the system when known.")


def prefix_request(system: str, question: str, max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=PREFIX, messages=[inference_pb2.ChatMessage(role="system", content=system),
                                inference_pb2.ChatMessage(role="user", content=question)],
        params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


@dataclass
class PrefixPhase:
    """Requests of one or more phases: (system prompt, ttft s, prompt tokens, cached prompt
    tokens, replica id) each; the wall time and CPU of each phase."""

    rows: list[tuple[int, float, int, int, str]] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    cpus: list[Cpu] = field(default_factory=list)

    def ttft(self, q: float) -> float:
        return pct([r[1] for r in self.rows], q)

    @property
    def hit_share(self) -> float:
        prompt = sum(r[2] for r in self.rows)
        return sum(r[3] for r in self.rows) / prompt if prompt else math.nan

    @property
    def misses(self) -> int:
        """Requests that found none of their prompt in the replica's prefix cache."""
        return sum(not r[3] for r in self.rows)

    def row(self, label: str, path: str, replicas: list[mesh_pb2.ReplicaInfo]) -> str:
        return (f"{label:>5} {path:>10} {self.ttft(0.5) * 1e3:>7.1f}ms {self.ttft(0.9) * 1e3:>7.1f}ms "
                f"{self.hit_share:>7.1%} {self.misses:>6} {self.replicas_per_prefix:>8.2f} "
                f"{self.split(replicas):>7} {len(self.rows) / sum(self.walls):>6.1f}   "
                f"{Cpu.merge(self.cpus).cores()}")

    @property
    def replicas_per_prefix(self) -> float:
        seen: dict[int, set[str]] = {}
        for system, *_, replica in self.rows:
            seen.setdefault(system, set()).add(replica)
        return sum(map(len, seen.values())) / len(seen) if seen else math.nan

    def split(self, replicas: list[mesh_pb2.ReplicaInfo]) -> str:
        count = Counter(r[4] for r in self.rows)
        return "/".join(str(count[r.replica_id]) for r in replicas)

    def extend(self, other: PrefixPhase) -> None:
        self.rows += other.rows
        self.walls += other.walls
        self.cpus += other.cpus


async def prefix_load(stub: inference_pb2_grpc.InferenceStub, systems: dict[int, str], requests: int,
                      concurrency: int, max_tokens: int, pids: dict[str, int | None],
                      metadata: Metadata = ()) -> PrefixPhase:
    """`requests` streams at `concurrency`, request j with system prompt j mod len(systems)
    and its own question; the time to the first chunk that carries tokens, and the usage."""
    keys = sorted(systems)
    out = PrefixPhase()
    left = iter(range(requests))

    async def loop() -> None:
        for j in left:
            Stop.check()
            system = keys[j % len(keys)]
            question = f"{QUESTIONS[j // len(keys) % len(QUESTIONS)]} My reference is {40213 + 7919 * j}."
            t0 = time.perf_counter()
            ttft, usage, replica = math.nan, common_pb2.Usage(), ""
            async for chunk in stub.GenerateStream(prefix_request(systems[system], question, max_tokens),
                                                   timeout=CALL_TIMEOUT, metadata=metadata):
                if chunk.token_ids and math.isnan(ttft):
                    ttft = time.perf_counter() - t0
                replica = chunk.replica_id or replica
                if chunk.finish_reason:
                    usage = chunk.usage
            out.rows.append((system, ttft, usage.prompt_tokens, usage.cached_prompt_tokens, replica))

    cpu = Cpu(pids)
    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    out.walls.append(time.perf_counter() - start)
    out.cpus.append(cpu.stop())
    return out


async def bench_prefix_affinity(args: argparse.Namespace, mesh: Mesh,
                                routers: dict[str, inference_pb2_grpc.InferenceStub],
                                replicas: list[mesh_pb2.ReplicaInfo]) -> float:
    """Prefix affinity on the real engine: the forged demo model (format hf) with its prefix
    cache on one replica per worker; requests that share a few long system prompts (each
    with its own question), through the router (routed by prompt prefix) and through a
    second router started with --no-prefix-affinity (least load), phases alternating, each
    with system prompts no earlier phase used. Returns p50 TTFT least-load / affinity."""
    n, conc, per = args.prefix_requests, args.prefix_concurrency, args.prefix_prompts
    next_prompt = 0

    def fresh(count: int) -> dict[int, str]:
        nonlocal next_prompt
        ks = range(next_prompt, next_prompt + count)
        next_prompt += count
        return {k: system_prompt(k) for k in ks}

    workers = {r.worker_id for r in replicas}
    pids = {name: pid for name, pid in mesh.pids().items()
            if name == "client" or mesh.instance(name) in workers}
    md = mesh.client_metadata
    # warm up both paths (connections, the engines' first forward passes) with their own prompts
    for stub in routers.values():
        await prefix_load(stub, fresh(2), 2 * conc, conc, args.prefix_max_tokens, {}, md)
    print(f"\nprefix affinity: {PREFIX} (the forged demo model, format hf, prefix_cache_mb="
          f"{args.prefix_cache_mb}, {args.torch_threads} torch thread(s) per worker) on {len(replicas)} replicas ({', '.join(r.worker_id for r in replicas)}); "
          f"each phase {n} GenerateStream (system + user message, max_tokens {args.prefix_max_tokens}, greedy) at "
          f"{conc} concurrent over {per} system prompts no earlier phase used; {PREFIX_ROUNDS} rounds, "
          "through the router (affinity: by prompt prefix) and a second router with --no-prefix-affinity "
          "(least-load); ttft = time to the first chunk with tokens")
    print(f"{'round':>5} {'router':>10} {'ttft p50':>9} {'ttft p90':>9} {'cached':>7} {'misses':>6} "
          f"{'replicas':>8} {'split':>7} {'req/s':>6}   cpu")
    results = {path: PrefixPhase() for path in routers}
    for r in range(PREFIX_ROUNDS):
        order = list(routers) if r % 2 == 0 else list(reversed(routers))  # ABBA: drift hits both alike
        for path in order:
            Stop.check()
            mesh.check_alive()
            phase_pids = {**pids, path: mesh.named[ROUTER_NAMES[path]].proc.pid}  # type: ignore[union-attr]
            res = await prefix_load(routers[path], fresh(per), n, conc, args.prefix_max_tokens, phase_pids, md)
            results[path].extend(res)
            print(res.row(str(r + 1), path, replicas))
    every = [row for res in results.values() for row in res.rows]
    bad = [row for row in every if math.isnan(row[1]) or not row[2]]
    tokens = sorted(row[2] for row in every)
    print(f"  cached: prompt tokens served from the prefix cache (cached_prompt_tokens / prompt_tokens); "
          f"misses: requests with none; replicas: distinct replicas per system prompt; split: requests per "
          f"replica; prompts "
          f"{tokens[0]}-{tokens[-1]} tokens ({min(map(len, map(system_prompt, range(next_prompt))))}-"
          f"{max(map(len, map(system_prompt, range(next_prompt))))} character system prompts)")
    for path, res in results.items():
        print(res.row("all", path, replicas))
    outcome = []
    for path, res in results.items():
        hit = [row[1] for row in res.rows if row[3]]
        miss = [row[1] for row in res.rows if not row[3]]
        outcome.append(f"{path} {pct(hit, 0.5) * 1e3:.1f} ms ({len(hit)}) / {pct(miss, 0.5) * 1e3:.1f} ms "
                       f"({len(miss)})")
    print("  ttft p50 with the prefix cached / not cached (requests): " + "; ".join(outcome))
    if bad:
        print(f"  {len(bad)} requests had no token or no usage: prefix_ttft_speedup not measured")
        return math.nan
    aff, load = results["affinity"], results["least-load"]
    speedup = load.ttft(0.5) / aff.ttft(0.5)
    print(f"  prefix_ttft_speedup (ttft p50 least-load / affinity) {speedup:.2f}x; p90 "
          f"{load.ttft(0.9) / aff.ttft(0.9):.2f}x")
    return speedup


# -- security ------------------------------------------------------------------------------


@dataclass
class SecurityResult:
    """One mesh's rounds of the security phase: its streaming loads and its unary load."""

    streams: list[Streams] = field(default_factory=list)
    unary: Unary = field(default_factory=Unary)  # every round's requests together
    unary_rates: list[float] = field(default_factory=list)  # req/s of each round

    @property
    def tokens(self) -> int:
        return sum(s.total_tokens for s in self.streams)

    @property
    def tokens_s(self) -> float:
        wall = sum(s.wall for s in self.streams)
        return self.tokens / wall if wall else math.nan

    def ttft(self, q: float) -> float:
        return pct([x for s in self.streams for x in s.first_token], q)

    @property
    def stream_cpu(self) -> Cpu:
        return Cpu.merge([s.cpu for s in self.streams])

    @property
    def unary_cpu(self) -> Cpu:
        return Cpu.merge(self.unary.cpus)


def generate_call(stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.GenerateRequest,
                  metadata: Metadata) -> Callable[[], Awaitable[object]]:
    """One unary Generate on `stub`, carrying `metadata` (a key, or nothing)."""
    return lambda: stub.Generate(request, timeout=CALL_TIMEOUT, metadata=metadata)


def per_unit(cpu: Cpu, units: int, who: str = "") -> float:
    """CPU microseconds per unit of work (a token, a request): of one process, or of all shown."""
    if not units:
        return math.nan
    used = cpu.used.get(who, (math.nan, 0.0))[0] if who else sum(t for t, _ in cpu.used.values())
    return used / units * 1e6


def security_row(label: str, mesh: str, load: str, wall: float, tokens_s: float, ttft50: float, ttft90: float,
                 rate: float, p50: float, p90: float, cpu: Cpu) -> str:
    def num(x: float, width: int, fmt: str, unit: str = "") -> str:
        return f"{'-':>{width + len(unit)}}" if math.isnan(x) else f"{x:>{width}{fmt}}{unit}"

    return (f"{label:>5} {mesh:>8} {load:>6} {wall:>7.2f} {num(tokens_s, 9, '.0f')} "
            f"{num(ttft50 * 1e3, 7, '.1f', 'ms')} {num(ttft90 * 1e3, 7, '.1f', 'ms')} {num(rate, 7, '.0f')} "
            f"{num(p50 * 1e3, 7, '.2f')} {num(p90 * 1e3, 7, '.2f')}   {cpu.cores()}")


async def bench_security(args: argparse.Namespace,
                         meshes: dict[str, tuple[Mesh, inference_pb2_grpc.InferenceStub]],
                         spy: PySpy | None) -> tuple[float, float]:
    """The cost of authentication and TLS: the same streaming load (--streams x --tokens of
    the streaming model) and the same unary Generate load (--requests at the highest
    --concurrency, the unary model) through the secure mesh's router (a tenant's key on
    every call, TLS on every link) and through the insecure mesh's (--insecure, no TLS, no
    key sent); rounds alternate ABBA. Returns (secure / insecure tokens/s, req/s)."""
    n, t, level = args.streams, args.tokens, max(args.levels)
    request = unary_request(FAST, args.max_tokens)
    for mesh, stub in meshes.values():  # warm up both alike at the phase's concurrency (untimed)
        md = mesh.client_metadata
        await stream_load([(stub, md)], n, min(t, 20), {})
        await unary_load(generate_call(stub, request, md), max(100, args.requests // 4), level, Unary())
    secure, insecure = meshes["secure"][0], meshes["insecure"][0]
    print(f"\nsecurity: what authentication and TLS cost. The secure mesh (the one above, as `maas up` makes it: "
          f"a service key per kind, TLS on every link, a tenant's inference key on every call to the router) "
          f"against a second mesh in the same etcd and NATS (prefix {insecure.prefix}) whose registry, "
          f"scheduler, router and {args.workers} workers run with --insecure and no TLS (no key "
          f"sent). Per round and mesh: {n} concurrent GenerateStream of {STREAM} x {t} tokens, then "
          f"{args.requests} unary Generate of {FAST} (max_tokens {args.max_tokens}) at {level} concurrent; "
          f"{args.security_rounds} rounds per mesh, ABBA; cpu = cores busy, process/event-loop thread")
    print(f"{'round':>5} {'mesh':>8} {'load':>6} {'wall s':>7} {'tokens/s':>9} {'ttft p50':>9} {'ttft p90':>9} "
          f"{'req/s':>7} {'p50 ms':>7} {'p90 ms':>7}   cpu")
    results = {label: SecurityResult() for label in meshes}
    for r in range(args.security_rounds):
        order = list(meshes) if r % 2 == 0 else list(reversed(meshes))  # ABBA: drift hits both alike
        for label in order:
            mesh, stub = meshes[label]
            md = mesh.client_metadata
            Stop.check()
            secure.check_alive()
            insecure.check_alive()
            pids = mesh.pids()
            profile = spy is not None and r == 0
            if profile:
                spy.start(f"security-{label}-stream", {k: v for k, v in pids.items() if v is not None})  # type: ignore[union-attr]
            got = await stream_load([(stub, md)], n, t, pids)
            if profile:
                print(f"  (py-spy: the {label} mesh's router and workers, streaming)")
                spy.stop()  # type: ignore[union-attr]
            results[label].streams.append(got)
            print(security_row(str(r + 1), label, "stream", got.wall, got.tokens_s, pct(got.first_token, 0.5),
                               pct(got.first_token, 0.9), math.nan, math.nan, math.nan, got.cpu))
            if profile:
                spy.start(f"security-{label}-unary{level}", {"router": pids["router"]})  # type: ignore[union-attr,dict-item]
            one = Unary()
            cpu = Cpu(pids)
            await unary_load(generate_call(stub, request, md), args.requests, level, one)
            one.cpus.append(cpu.stop())
            if profile:
                print(f"  (py-spy: the {label} mesh's router, unary at concurrency {level})")
                spy.stop()  # type: ignore[union-attr]
            results[label].unary_rates.append(one.rate)
            u = results[label].unary
            u.latencies += one.latencies
            u.requests += one.requests
            u.wall += one.wall
            u.cpus += one.cpus
            print(security_row(str(r + 1), label, "unary", one.wall, math.nan, math.nan, math.nan, one.rate,
                               pct(one.latencies, 0.5), pct(one.latencies, 0.9), one.cpus[0]))
    for label, res in results.items():
        print(security_row("all", label, "stream", sum(s.wall for s in res.streams), res.tokens_s, res.ttft(0.5),
                           res.ttft(0.9), math.nan, math.nan, math.nan, res.stream_cpu))
    for label, res in results.items():
        u = res.unary
        print(security_row("all", label, "unary", u.wall, math.nan, math.nan, math.nan, u.rate,
                           pct(u.latencies, 0.5), pct(u.latencies, 0.9), res.unary_cpu))
    s, i = results["secure"], results["insecure"]
    print("  cpu per unit of work, secure / insecure (less noisy than throughput on a shared machine): "
          f"router {per_unit(s.stream_cpu, s.tokens, 'router'):.1f} / {per_unit(i.stream_cpu, i.tokens, 'router'):.1f} "
          f"us per token, {per_unit(s.unary_cpu, s.unary.requests, 'router'):.0f} / "
          f"{per_unit(i.unary_cpu, i.unary.requests, 'router'):.0f} us per request; every process shown "
          f"{per_unit(s.stream_cpu, s.tokens):.1f} / {per_unit(i.stream_cpu, i.tokens):.1f} us per token, "
          f"{per_unit(s.unary_cpu, s.unary.requests):.0f} / {per_unit(i.unary_cpu, i.unary.requests):.0f} "
          "us per request")
    # every stream must be whole, and the same tokens through either mesh (one model, one prompt)
    reference = s.streams[0].tokens
    short = sum(len(x) != t for res in results.values() for st in res.streams for x in st.tokens)
    wrong = sum(a != b for res in results.values() for st in res.streams
                for a, b in zip(st.tokens, reference, strict=True))
    stream_ratio = s.tokens_s / i.tokens_s
    unary_ratio = s.unary.rate / i.unary.rate
    rounds = range(args.security_rounds)  # the spread of the rounds shows what the noise alone does
    print("  per round, secure / insecure: streaming tokens/s "
          + " ".join(f"{s.streams[r].tokens_s / i.streams[r].tokens_s:.2f}" for r in rounds)
          + "; unary req/s " + " ".join(f"{s.unary_rates[r] / i.unary_rates[r]:.2f}" for r in rounds))
    print(f"  secure / insecure: streaming {stream_ratio:.3f}x tokens/s (cost {1 - stream_ratio:.1%}; goal under "
          f"10%), ttft p50 {s.ttft(0.5) / i.ttft(0.5):.2f}x; unary {unary_ratio:.3f}x req/s (cost "
          f"{1 - unary_ratio:.1%}), p50 {pct(s.unary.latencies, 0.5) / pct(i.unary.latencies, 0.5):.2f}x")
    if short or wrong:
        print(f"  STREAMS DIFFER: {short} not {t} tokens long, {wrong} not the tokens of the first secure round's "
              "stream for the same prompt: auth_tls_stream_ratio not measured")
        stream_ratio = math.nan
    return stream_ratio, unary_ratio


# -- the run -------------------------------------------------------------------------------


def start_services(mesh: Mesh, args: argparse.Namespace, worker_gib: int, *, lb_router: bool = False,
                   profile: str = "") -> None:
    """A registry, a scheduler, a router (and the least-load router), --workers workers."""
    mesh.spawn("registry", "registry", "--blob-dir", str(mesh.home / "blobs"))
    mesh.spawn("scheduler", "scheduler")
    mesh.spawn("router", "router", "--port", "0", "--instance", mesh.instance("router"), *router_extra_flags(),
               profile=profile)
    if lb_router:  # the baseline of the prefix part: the same router, routing by load only
        mesh.spawn("router-lb", "router", "--port", "0", "--instance", mesh.instance("router-lb"),
                   "--no-prefix-affinity", *router_extra_flags())
    for i in range(args.workers):
        mesh.spawn(f"w{i}", "worker", "--instance", mesh.instance(f"w{i}"), "--device", "cpu",
                   "--cpu-memory-gib", str(worker_gib), "--cache-dir", str(mesh.home / f"cache-w{i}"),
                   "--torch-threads", str(args.torch_threads))


async def sim_models(args: argparse.Namespace, mesh: Mesh, client: MeshClient
                     ) -> tuple[grpc.aio.Channel, grpc.aio.Channel, grpc.aio.Channel]:
    """The registry's and the scheduler's channels (as the admin), a tenant key on a secure
    mesh, the router's channel, and the two sim models deployed (not yet waited for)."""
    registry = await channel_to(client, mesh, "registry")
    scheduler = await channel_to(client, mesh, "scheduler")
    if mesh.security is not None:  # a tenant's inference key, made by the admin through the registry
        created = await registry_pb2_grpc.RegistryStub(registry).CreateKey(
            registry_pb2.CreateKeyRequest(tenant="bench", role="inference"), timeout=10)
        mesh.client_metadata = credential_metadata(created.key)
    router = await router_channel(client, mesh, mesh.instance("router"))
    await wait_workers(client, mesh, args.workers)
    await deploy(registry, scheduler, FAST, 1, token_delay_ms="0")
    await deploy(registry, scheduler, STREAM, args.workers, token_delay_ms=f"{args.stream_delay_ms:g}")
    return registry, scheduler, router


async def bench(args: argparse.Namespace, mesh: Mesh, plain: Mesh | None, spy: PySpy | None) -> int:
    """`mesh` is the secure mesh every phase measures; `plain`, the insecure one the
    security phase compares it with (None with --no-security)."""
    main = asyncio.current_task()
    assert main is not None

    def interrupt() -> None:
        Stop.requested = True
        main.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, interrupt)

    assert mesh.security is not None
    client = mesh.admin_client()
    plain_client = plain.admin_client() if plain is not None else None
    forge: asyncio.Task[str] | None = None
    channels: list[grpc.aio.Channel] = []  # to the routers
    try:
        t0 = time.perf_counter()
        prefix_memory = (KV_CACHE_MB + args.prefix_cache_mb + 64) * 1024**2  # KV, prefix cache, weights
        worker_gib = max(2, math.ceil(prefix_memory / 1024**3) + 1) if args.prefix else 2
        if args.prefix:
            forge = asyncio.ensure_future(demo_model())  # meanwhile, the mesh starts
        await mesh.security.install(mesh.etcd, mesh.prefix)  # before any service starts, as `maas up`
        start_services(mesh, args, worker_gib, lb_router=args.prefix, profile=args.profile_router)
        if plain is not None:  # under cProfile too when the secure router is, so that the two compare
            start_services(plain, args, 2, profile=f"{args.profile_router}.insecure" if args.profile_router else "")
        registry, scheduler, router_ch = await sim_models(args, mesh, client)
        channels.append(router_ch)
        router = inference_pb2_grpc.InferenceStub(router_ch)
        plain_router: inference_pb2_grpc.InferenceStub | None = None
        if plain is not None and plain_client is not None:
            channels.append((await sim_models(args, plain, plain_client))[2])
            plain_router = inference_pb2_grpc.InferenceStub(channels[-1])
        if forge is not None:
            source = await forge
            await deploy(registry, scheduler, PREFIX, args.workers, fmt="hf", source=source,
                         memory_bytes=prefix_memory, prefix_cache_mb=str(args.prefix_cache_mb))
        fast = await wait_ready(client, mesh, FAST, 1)
        stream = await wait_ready(client, mesh, STREAM, args.workers)
        md = mesh.client_metadata
        await until_routed(router, FAST, md)
        await until_routed(router, STREAM, md)
        if plain is not None and plain_client is not None and plain_router is not None:
            await wait_ready(plain_client, plain, FAST, 1)
            await wait_ready(plain_client, plain, STREAM, args.workers)
            await until_routed(plain_router, FAST, ())
            await until_routed(plain_router, STREAM, ())
        routers: dict[str, inference_pb2_grpc.InferenceStub] = {}
        prefix_replicas: list[mesh_pb2.ReplicaInfo] = []
        if args.prefix:
            channels.append(await router_channel(client, mesh, mesh.instance("router-lb")))
            routers = {"affinity": router, "least-load": inference_pb2_grpc.InferenceStub(channels[-1])}
            prefix_replicas = await wait_ready(client, mesh, PREFIX, args.workers, timeout=300)
            for stub in routers.values():
                await until_routed(stub, PREFIX, md, timeout=60)
        print(f"mesh: etcd, nats-server, registry, scheduler, {len(routers) or 1} router(s) and {args.workers} "
              f"workers as separate processes, up in {time.perf_counter() - t0:.1f} s (python "
              f"{platform.python_version()}, grpcio {grpc.__version__}, {os.cpu_count()} CPUs); secure as "
              "`maas up` makes it: every service has its own key and serves and dials over TLS (a CA and a "
              "certificate per kind), the client sends a tenant's inference key to the router and, on the "
              "direct path, the router's service key to the worker")
        if plain is not None:
            print(f"  and the insecure mesh for the security phase (prefix {plain.prefix}): registry, scheduler, "
                  f"router and {args.workers} workers with --insecure and no TLS, idle until then")
        for name, placed in ((STREAM, stream), (PREFIX, prefix_replicas)):
            where = Counter(r.worker_id for r in placed)
            if len(where) < len(placed):
                print(f"  note: {name} replicas share workers: {dict(where)}")
        if args.profile_router:
            print(f"  the router runs under cProfile (slower): {args.profile_router}"
                  + (f"; the insecure mesh's too: {args.profile_router}.insecure" if plain is not None else ""))

        overhead, ratio = await bench_unary(args, mesh, router, fast[0], spy)
        tokens_s = await bench_streaming(args, mesh, router, stream, spy)
        speedup = math.nan
        if args.prefix:
            speedup = await bench_prefix_affinity(args, mesh, routers, prefix_replicas)
        else:
            print("\nprefix affinity: skipped (--no-prefix)")
        auth_stream = auth_unary = math.nan
        if plain is not None and plain_router is not None:
            auth_stream, auth_unary = await bench_security(
                args, {"secure": (mesh, router), "insecure": (plain, plain_router)}, spy)
        else:
            print("\nsecurity: skipped (--no-security)")
        mesh.check_alive()

        print(f"router_overhead_ms={sig(overhead)} router_vs_direct={sig(ratio)} "
              f"stream_tokens_s={sig(tokens_s, '.0f')} prefix_ttft_speedup={sig(speedup)} "
              f"auth_tls_stream_ratio={sig(auth_stream)} auth_tls_unary_ratio={sig(auth_unary)}", flush=True)
        measured = [overhead, ratio, tokens_s]
        if args.prefix:
            measured.append(speedup)
        if plain is not None:
            measured += [auth_stream, auth_unary]
        return 1 if any(math.isnan(x) for x in measured) else 0
    finally:
        if forge is not None and not forge.done():
            forge.cancel()
            with contextlib.suppress(BaseException):
                await forge
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close()
        if spy is not None:
            spy.kill()
        for c in (client, plain_client):
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.close()


def router_extra_flags() -> list[str]:
    """No HTTP API (the bench speaks gRPC; its default port may be taken), where the
    router has one."""
    from maas.services.router import main as router_main

    parser = argparse.ArgumentParser()
    router_main.add_arguments(parser)
    _, unknown = parser.parse_known_args(["--http-port", "-1"])
    return [] if unknown else ["--http-port", "-1"]


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("--concurrency takes positive integers, e.g. 1,64")
    return levels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="unary requests per row (path x concurrency)")
    parser.add_argument("--concurrency", type=parse_levels, default=[1, 64], dest="levels",
                        help="unary concurrency levels, comma-separated (overhead: the lowest; ratio: the highest)")
    parser.add_argument("--max-tokens", type=int, default=2, help="max_tokens of each unary request")
    parser.add_argument("--streams", type=int, default=256, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per stream")
    parser.add_argument("--stream-delay-ms", type=float, default=0.0,
                        help="sim token_delay_ms of the streaming model (0: as fast as the worker can)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (one streaming replica each)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: 300 requests, 32 streams x 100 tokens, 32 prefix requests per phase")
    parser.add_argument("--no-prefix", dest="prefix", action="store_false",
                        help="skip the prefix-affinity part (no hf model, no second router)")
    parser.add_argument("--prefix-requests", type=int, default=128, help="prefix part: requests per phase")
    parser.add_argument("--prefix-concurrency", type=int, default=8, help="prefix part: concurrent requests")
    parser.add_argument("--prefix-prompts", type=int, default=4, help="prefix part: system prompts per phase")
    parser.add_argument("--prefix-max-tokens", type=int, default=4, help="prefix part: max_tokens per request")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="each worker's --torch-threads (default: $OMP_NUM_THREADS, else the "
                             "CPUs divided by the workers; torch's default, every CPU in each worker, thrashes)")
    parser.add_argument("--prefix-cache-mb", type=int, default=1024,
                        help="prefix part: the engines' prefix_cache_mb (generous: no phase evicts its own prefixes)")
    parser.add_argument("--no-security", dest="security", action="store_false",
                        help="skip the security phase (no insecure mesh; auth_tls_*_ratio print as nan)")
    parser.add_argument("--security-rounds", type=int, default=4,
                        help="security phase: rounds per mesh, alternating (secure, insecure, insecure, "
                             "secure, ...: ABBA; at least 2)")
    parser.add_argument("--py-spy", default="", metavar="DIR",
                        help="sample the router (unary at the highest concurrency), the router and workers "
                             "(routed streaming) and, in the security phase's first round, each mesh's router "
                             "and workers (streaming) and router (unary) with py-spy; raw stacks go to DIR")
    parser.add_argument("--py-spy-native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--profile-router", default="", metavar="FILE",
                        help="run the router under cProfile, stats to FILE (printed at the end; slows it down)")
    parser.add_argument("--keep-logs", default="", metavar="DIR", help="copy the processes' logs to DIR")
    parser.add_argument("--log-level", default="WARNING", help="of the mesh processes")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.streams, args.tokens = 300, 32, 100
        args.prefix_requests = min(args.prefix_requests, 32)
    if args.torch_threads < 1:
        args.torch_threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // args.workers))
    if args.prefix and 2 * (2 + PREFIX_ROUNDS * args.prefix_prompts) > len(ORGS) * (1 + len(BRANCHES)):
        parser.error("--prefix-prompts: too many for the distinct system prompts bench/router.py writes")
    if args.security and args.security_rounds < 2:
        parser.error("--security-rounds: at least 2 (ABBA), or --no-security")
    if args.prefix and args.workers < 2:
        parser.error("the prefix part compares two replicas' caches: --workers 2 or more (or --no-prefix)")
    spy = None
    if args.py_spy:
        beside = Path(sys.executable).parent / "py-spy"  # installed in this virtual environment
        exe = os.environ.get("PY_SPY", "") or shutil.which("py-spy") or (str(beside) if beside.is_file() else "")
        if not exe:
            parser.error("--py-spy: py-spy not found on PATH (pip install py-spy, or set PY_SPY to its path)")
        spy = PySpy(exe, Path(args.py_spy), args.py_spy_rate, args.py_spy_native)
    if args.profile_router:
        args.profile_router = str(Path(args.profile_router).resolve())

    run_id = f"{random.getrandbits(32):08x}"
    prefix, plain_prefix = f"/bench-router-{run_id}/", f"/bench-router-insecure-{run_id}/"
    status = 1
    with tempfile.TemporaryDirectory(prefix="maas-bench-router-") as tmp_dir:
        tmp = Path(tmp_dir)
        mesh: Mesh | None = None
        try:
            with contextlib.ExitStack() as stack:
                etcd, etcd_url = start_etcd(tmp / "etcd" / "data", log_dir=tmp / "logs")
                stack.callback(etcd.stop)
                nats, nats_url = start_nats(tmp / "nats" / "js", log_dir=tmp / "logs")
                stack.callback(nats.stop)
                mesh = Mesh(etcd_url, nats_url, prefix, tmp, args.log_level, Security.make(tmp / "secrets"))
                stack.callback(mesh.stop)
                plain = None
                if args.security:  # the security phase's baseline: the same services, --insecure, no TLS
                    plain = Mesh(etcd_url, nats_url, plain_prefix, tmp / "insecure", args.log_level,
                                 instance_prefix="bench-insecure-")
                    stack.callback(plain.stop)
                status = asyncio.run(bench(args, mesh, plain, spy))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted", file=sys.stderr)
            status = 130
        except Exception as e:  # a process that died, a deployment that never got ready
            print(f"bench failed: {type(e).__name__}: {e}", file=sys.stderr)
            print("router_overhead_ms=nan router_vs_direct=nan stream_tokens_s=nan prefix_ttft_speedup=nan "
                  "auth_tls_stream_ratio=nan auth_tls_unary_ratio=nan", flush=True)
            status = 1
        finally:
            if args.keep_logs:
                shutil.copytree(tmp / "logs", args.keep_logs, dirs_exist_ok=True)
                if (tmp / "insecure" / "logs").is_dir():
                    shutil.copytree(tmp / "insecure" / "logs", Path(args.keep_logs) / "insecure", dirs_exist_ok=True)
            left = leftovers(prefix, plain_prefix, tmp_dir)
            if left:
                print(f"WARNING: {len(left)} processes left running:\n  " + "\n  ".join(left), file=sys.stderr)
            else:
                print("cleanup: every process the bench started has exited", file=sys.stderr)
    if args.profile_router and Path(args.profile_router).is_file():
        print(f"\ncProfile of the router process ({args.profile_router}), top 25 by own time:", file=sys.stderr)
        pstats.Stats(args.profile_router, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    return status


if __name__ == "__main__":
    sys.exit(main())
