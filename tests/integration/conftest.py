"""Real etcd and nats-server on free ports; services in-process or as real processes.

Every test gets its own etcd key prefix, so tests share one etcd and one NATS without
seeing each other's workers or deployments.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from maas.mesh.auth import ADMIN_TOKEN_ENV, new_key
from maas.mesh.clients import MeshClient
from maas.mesh.config import MeshConfig
from maas.mesh.server import ServiceRuntime
from maas.services.registry import main as registry_main
from maas.services.registry.apikeys import install_admin_token, put_key
from maas.services.router import main as router_main
from maas.services.router.pool import ReplicaPool
from maas.services.scheduler import main as scheduler_main
from maas.services.worker import main as worker_main
from maas.services.worker.devices import detect_devices
from maas.services.worker.engines import create_engine
from maas.services.worker.replicas import EngineFactory, ReplicaManager
from maas.stack.servers import Child, start_etcd, start_nats
from maas.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    child, url = start_etcd(tmp_path_factory.mktemp("etcd") / "data")
    yield url
    child.stop()


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    child, url = start_nats(tmp_path_factory.mktemp("nats") / "js")
    yield url
    child.stop()


SERVICE_KINDS = ("router", "worker", "scheduler", "registry")


@dataclass
class MeshHarness:
    """A mesh under one test's private etcd prefix. Secure as `maas up` makes it: every
    service presents its own service key, and the test's client is the admin
    (`admin_token`); `key(tenant, role)` makes tenants' keys."""

    etcd: str
    nats: str
    prefix: str
    tmp: Path
    runtimes: list[ServiceRuntime] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    _client: MeshClient | None = None
    router_pool: ReplicaPool | None = None  # the last in-process router's
    admin_token: str = field(default_factory=lambda: new_key()[0])
    service_keys: dict[str, str] = field(default_factory=lambda: {k: new_key()[0] for k in SERVICE_KINDS})

    async def install_credentials(self) -> None:
        """The admin token's and the services' key records, as `maas up` writes them."""
        async with MeshClient(self.etcd, self.prefix) as m:
            await install_admin_token(m.etcd, m.keys, self.admin_token)
            for kind, key in self.service_keys.items():
                await put_key(m.etcd, m.keys, key, registry_pb2.ApiKey(id=f"svc-{kind}", service=kind))

    async def key(self, tenant: str, role: str = "developer", **limits: object) -> str:
        """A new key of `tenant` (made by the admin through the registry)."""
        stub = await self.stub("registry")
        created = await stub.CreateKey(registry_pb2.CreateKeyRequest(  # type: ignore[attr-defined]
            tenant=tenant, role=role, **limits), timeout=10)
        return str(created.key)

    def config(self, kind: str, **kw: object) -> MeshConfig:
        kw.setdefault("lease_ttl", 2)
        kw.setdefault("metrics_port", -1)
        kw.setdefault("credential", self.service_keys[kind])
        return MeshConfig(kind=kind, etcd=self.etcd, nats=self.nats, prefix=self.prefix, grace=2.0,
                          **kw)  # type: ignore[arg-type]

    async def _runtime(self, kind: str, **kw: object) -> ServiceRuntime:
        rt = ServiceRuntime(self.config(kind, **kw))
        self.runtimes.append(rt)
        return rt

    async def registry(self) -> ServiceRuntime:
        rt = await self._runtime("registry")
        await registry_main.build(rt, self.tmp / "blobs", admin_token=self.admin_token)
        return rt

    async def scheduler(self, **build_kw: float) -> ServiceRuntime:
        rt = await self._runtime("scheduler")
        await scheduler_main.build(rt, **build_kw)
        return rt

    async def router(self, cold_start_timeout: float = 30.0, http_port: int = -1, failover_timeout: float = 30.0,
                     http_timeout: float = 600.0, grpc_timeout: float = 600.0, queue_timeout: float = 0.0,
                     **kw: object) -> ServiceRuntime:
        """`http_port` 0 serves the OpenAI HTTP API on a free port (`rt.info.http_endpoint`)."""
        rt = await self._runtime("router", **kw)
        self.router_pool = await router_main.build(rt, cold_start_timeout=cold_start_timeout, http_port=http_port,
                                failover_timeout=failover_timeout, http_timeout=http_timeout,
                                grpc_timeout=grpc_timeout, queue_timeout=queue_timeout)
        return rt

    async def worker(self, memory_gib: float = 4.0, engine_factory: EngineFactory = create_engine) -> ReplicaManager:
        """An in-process worker; returns its replica manager (`.rt` is its runtime)."""
        rt = await self._runtime("worker")
        return await worker_main.build(rt, devices=detect_devices("cpu", int(memory_gib * 2**30)),
                                       engine_factory=engine_factory, cache_dir=self.tmp / f"cache-{rt.config.instance}")

    async def core(self) -> None:
        """registry + scheduler + router, in-process."""
        await self.registry()
        await self.scheduler()
        await self.router()

    async def serving(self, model: str = "echo", *, http: bool = True, **options: str) -> ServiceRuntime:
        """registry, scheduler, a router (its HTTP API on a free port unless `http` is off),
        an in-process worker, and the sim model `model` (with `options`) deployed and ready.
        Returns the router's runtime."""
        await self.registry()
        await self.scheduler()
        router = await self.router(http_port=0 if http else -1)
        await self.worker()
        await self.register(model, **options)
        await self.deploy(model)
        await self.wait_ready(model)
        return router

    async def serving_hf(self, source: Path, name: str = "demo",
                         engine_factory: EngineFactory = create_engine) -> ServiceRuntime:
        """registry, scheduler, a router with its HTTP API on a free port, an in-process
        worker, and the transformers model at `source` (the forged demo model) deployed as
        `name` and ready. Returns the router's runtime."""
        await self.registry()
        await self.scheduler()
        router = await self.router(http_port=0)
        await self.worker(engine_factory=engine_factory)
        await self.register(name, fmt="hf", source=str(source))
        await self.deploy(name)
        await self.wait_ready(name, timeout=60)
        return router

    def spawn(self, kind: str, *args: str, env: dict[str, str] | None = None) -> Child:
        """Run a service as a real process (for tests that kill it), with `env` added to its
        environment."""
        name = f"{kind}-{len(self.children)}"
        child = Child(name, [sys.executable, "-m", "maas", kind, "--etcd", self.etcd, "--nats", self.nats,
                             "--prefix", self.prefix, "--lease-ttl", "2", "--metrics-port", "-1", *args],
                      self.tmp / f"{name}.log",
                      env={**os.environ, "PYTHONUNBUFFERED": "1", "MAAS_CREDENTIAL": self.service_keys[kind],
                           **(env or {})}).start()
        self.children.append(child)
        return child

    def endpoint(self, kind: str) -> str:
        """The gRPC endpoint of the first in-process service of `kind`."""
        return next(rt.endpoint for rt in self.runtimes if rt.config.kind == kind)

    async def client(self) -> MeshClient:
        if self._client is None:
            self._client = MeshClient(self.etcd, self.prefix, credential=self.admin_token)
        return self._client

    async def stub(self, kind: str) -> object:
        channel = await (await self.client()).channel(kind)
        return {"registry": registry_pb2_grpc.RegistryStub, "scheduler": scheduler_pb2_grpc.SchedulerStub,
                "router": inference_pb2_grpc.InferenceStub}[kind](channel)

    async def register(self, name: str, *, fmt: str = "sim", source: str = "", memory_mib: int = 0,
                       **options: str) -> registry_pb2.ModelVersion:
        stub = await self.stub("registry")
        return await stub.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[attr-defined]
            name=name, format=fmt, source=source, options=options,
            resources=common_pb2.Resources(memory_bytes=memory_mib * 2**20)), timeout=10)

    async def deploy(self, name: str, replicas: int = 1, model: str = "",
                     autoscale: scheduler_pb2.Autoscale | None = None) -> scheduler_pb2.DeploymentStatus:
        stub = await self.stub("scheduler")
        return await stub.CreateDeployment(scheduler_pb2.CreateDeploymentRequest(  # type: ignore[attr-defined]
            deployment=scheduler_pb2.Deployment(name=name, model=model or name, replicas=replicas,
                                                autoscale=autoscale)), timeout=10)

    async def wait_ready(self, name: str, replicas: int = 1, timeout: float = 30.0) -> scheduler_pb2.DeploymentStatus:
        stub = await self.stub("scheduler")
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            st = await stub.GetDeployment(scheduler_pb2.GetDeploymentRequest(name=name), timeout=5)  # type: ignore[attr-defined]
            if st.ready_replicas >= replicas:
                return st
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{name} not ready after {timeout}s: {st.message}")
            await asyncio.sleep(0.1)

    async def generate(self, model: str, prompt: str = "hello world", timeout: float = 20.0,
                       **params: object) -> list[inference_pb2.GenerateChunk]:
        stub = await self.stub("router")
        request = inference_pb2.GenerateRequest(model=model, prompt=prompt,
                                                params=common_pb2.SamplingParams(**params))  # type: ignore[arg-type]
        return [c async for c in stub.GenerateStream(request, timeout=timeout)]  # type: ignore[attr-defined]

    async def reset_client(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def close(self) -> None:
        await self.reset_client()
        for rt in reversed(self.runtimes):
            await rt.stop()
        for child in reversed(self.children):
            child.stop(timeout=5)


@pytest.fixture
async def mesh(etcd_url: str, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
               ) -> AsyncIterator[MeshHarness]:
    m = MeshHarness(etcd=etcd_url, nats=nats_url, prefix=f"/t{uuid.uuid4().hex[:10]}/", tmp=tmp_path)
    await m.install_credentials()
    monkeypatch.setenv(ADMIN_TOKEN_ENV, m.admin_token)  # `maas` commands the test runs act as the admin
    yield m
    await m.close()


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[object]:
    """Read a stream to its end with read() (gRPC forbids mixing read() and iteration)."""
    out = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        out.append(msg)
    return out


async def eventually(check: Callable[[], object], timeout: float = 15.0, interval: float = 0.1) -> object:
    """Wait for a condition (never a fixed sleep): retries `check` until it returns truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: object = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
        except Exception as e:  # e.g. a client still reconnecting: keep waiting
            last = e
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last})")
