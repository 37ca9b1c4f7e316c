"""Deployments (desired state) in etcd: validated, resolved to a model version, stored.

Reads go to etcd rather than the scheduler's mirror, so a client sees its own writes at
once. Any scheduler instance serves these calls; only the leader acts on them.
"""

from __future__ import annotations

import time

from maas.mesh.clients import RegistryClient
from maas.mesh.errors import AlreadyExists, InvalidArgument, NotFound
from maas.mesh.etcd import EtcdSession
from maas.mesh.names import validate_name
from maas.v1 import scheduler_pb2

MAX_REPLICAS = 256


class DeploymentStore:
    def __init__(self, session: EtcdSession, resolver: RegistryClient) -> None:
        self.session = session
        self.resolver = resolver

    async def _prepare(self, dep: scheduler_pb2.Deployment) -> scheduler_pb2.Deployment:
        validate_name(dep.name, "deployment")
        if dep.replicas > MAX_REPLICAS:
            raise InvalidArgument(f"replicas must be <= {MAX_REPLICAS}", field="replicas")
        out = scheduler_pb2.Deployment()
        out.CopyFrom(dep)
        out.model = dep.model or dep.name
        version = await self.resolver.resolve(out.model)
        out.resolved_version = f"{version.name}@{version.version}"
        if len(out.traffic) > 1:
            raise InvalidArgument("one canary at a time: traffic takes at most one entry", field="traffic")
        for split in out.traffic:
            if not 1 <= split.weight <= 99:
                raise InvalidArgument(f"canary weight must be 1..99 percent, got {split.weight}", field="weight")
            canary = await self.resolver.resolve(split.model)
            split.model = f"{canary.name}@{canary.version}"
            if split.model == out.resolved_version:
                raise InvalidArgument(f"the canary {split.model} is the version already deployed", field="canary")
        out.updated_ms = int(time.time() * 1000)
        return out

    async def create(self, dep: scheduler_pb2.Deployment) -> scheduler_pb2.Deployment:
        dep = await self._prepare(dep)
        dep.created_ms = dep.updated_ms
        key, tx = self.session.keys.deployment(dep.name), self.session.client.transactions
        ok, _ = await self.session.client.transaction(
            compare=[tx.create(key) == 0], success=[tx.put(key, dep.SerializeToString())], failure=[])
        if not ok:
            raise AlreadyExists(f"deployment {dep.name!r} already exists; use update or scale")
        return dep

    async def update(self, dep: scheduler_pb2.Deployment) -> scheduler_pb2.Deployment:
        current = await self.get(dep.name)
        dep = await self._prepare(dep)
        dep.created_ms = current.created_ms
        await self.session.client.put(self.session.keys.deployment(dep.name), dep.SerializeToString())
        return dep

    async def get(self, name: str) -> scheduler_pb2.Deployment:
        validate_name(name, "deployment")
        raw = await self.session.get(self.session.keys.deployment(name))
        if raw is None:
            raise NotFound(f"deployment {name!r} does not exist")
        return scheduler_pb2.Deployment.FromString(raw)

    async def list(self) -> list[scheduler_pb2.Deployment]:
        pairs, _ = await self.session.get_prefix(self.session.keys.deployments())
        return sorted((scheduler_pb2.Deployment.FromString(v) for _, v in pairs), key=lambda d: d.name)

    async def delete(self, name: str) -> None:
        await self.get(name)
        await self.session.client.delete(self.session.keys.deployment(name))
