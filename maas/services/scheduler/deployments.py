"""Deployments (desired state) in etcd: validated, resolved to a model version, stored.

Reads go to etcd rather than the scheduler's mirror, so a client sees its own writes at
once. Any scheduler instance serves these calls; only the leader acts on them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from maas.mesh.clients import RegistryClient
from maas.mesh.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
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
        if dep.HasField("autoscale"):
            auto = dep.autoscale
            if not 1 <= auto.max_replicas <= MAX_REPLICAS:
                raise InvalidArgument(f"autoscale max_replicas must be 1..{MAX_REPLICAS}", field="max_replicas")
            if auto.min_replicas > auto.max_replicas:
                raise InvalidArgument(f"autoscale min_replicas ({auto.min_replicas}) is above max_replicas "
                                      f"({auto.max_replicas})", field="min_replicas")
            for name in ("target_in_flight", "scale_up_seconds", "cooldown_seconds"):
                if getattr(auto, name) < 0 or getattr(auto, name) != getattr(auto, name):  # negative or NaN
                    raise InvalidArgument(f"autoscale {name} must be >= 0", field=name)
            # the scheduler owns the count from here on; start within the bounds
            out.replicas = min(auto.max_replicas, max(auto.min_replicas, dep.replicas))
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
        served = {out.resolved_version, *(split.model for split in out.traffic)}
        for adapter in out.adapters:
            version = await self.resolver.resolve(adapter)
            if not version.base:
                raise InvalidArgument(f"{adapter!r} is not an adapter (it has no base model)", field="adapters")
            if version.base not in served:
                raise InvalidArgument(f"adapter {adapter!r} is for {version.base}, but deployment {out.name!r} "
                                      f"serves {out.resolved_version}", field="adapters")
            if adapter.partition("@")[0] == out.name:
                raise InvalidArgument(f"adapter {adapter!r} has the deployment's own name", field="adapters")
        if len(set(out.adapters)) != len(out.adapters):
            raise InvalidArgument("adapters are listed more than once", field="adapters")
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
        """Replace a deployment. An autoscaled one keeps the replica count the scheduler set
        (within the new bounds): a client's copy of it may be stale. Compared on the stored
        revision, so a concurrent write (the autoscaler's, a cold start's) is never lost."""
        def replace(wanted: scheduler_pb2.Deployment) -> bool:
            wanted.CopyFrom(dep)
            return True

        return await self.modify(dep.name, replace)

    async def modify(self, name: str,
                     change: Callable[[scheduler_pb2.Deployment], bool]) -> scheduler_pb2.Deployment:
        """Read-modify-write the stored deployment: `change` edits a copy (returning False
        when there is nothing to change), compared on the revision it was read at, so a
        concurrent write (a user's, the autoscaler's, another job's adapter) is never
        overwritten: on a conflict `change` is applied again to what is stored now."""
        validate_name(name, "deployment")
        key, tx = self.session.keys.deployment(name), self.session.client.transactions
        for _ in range(10):
            got = await self.session.client.get(key)
            if got is None:
                raise NotFound(f"deployment {name!r} does not exist")
            current = scheduler_pb2.Deployment.FromString(got.value)
            wanted = scheduler_pb2.Deployment()
            wanted.CopyFrom(current)
            wanted.model = current.resolved_version  # an alias moving meanwhile must not roll it out
            if not change(wanted):
                return current
            out = await self._prepare(wanted)
            out.created_ms = current.created_ms
            if out.autoscale.max_replicas and current.autoscale.max_replicas:  # the scheduler's count stands
                out.replicas = min(out.autoscale.max_replicas, max(out.autoscale.min_replicas, current.replicas))
            out.previous_version = (current.resolved_version if out.resolved_version != current.resolved_version
                                    else current.previous_version)
            ok, _ = await self.session.client.transaction(
                compare=[tx.mod(key) == got.mod_revision], success=[tx.put(key, out.SerializeToString())], failure=[])
            if ok:
                return out
        raise Unavailable(f"deployment {name!r} keeps changing; try again")

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

    async def activate(self, name: str) -> tuple[scheduler_pb2.Deployment, bool]:
        """Give an autoscaled deployment at zero replicas one replica (a cold start).
        Returns the deployment and whether this call scaled it."""
        key, tx = self.session.keys.deployment(name), self.session.client.transactions
        for _ in range(10):
            validate_name(name, "deployment")
            got = await self.session.client.get(key)
            if got is None:
                raise NotFound(f"deployment {name!r} does not exist")
            dep = scheduler_pb2.Deployment.FromString(got.value)
            if dep.replicas > 0 or not dep.autoscale.max_replicas:
                return dep, False
            dep.replicas = 1
            ok, _ = await self.session.client.transaction(
                compare=[tx.mod(key) == got.mod_revision], success=[tx.put(key, dep.SerializeToString())], failure=[])
            if ok:
                return dep, True
        raise Unavailable(f"deployment {name!r} keeps changing; try again")
