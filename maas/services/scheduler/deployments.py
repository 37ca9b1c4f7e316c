"""Deployments (desired state) in etcd: validated, resolved to a model version, stored.

Reads go to etcd rather than the scheduler's mirror, so a client sees its own writes at
once. Any scheduler instance serves these calls; only the leader acts on them.

A deployment belongs to a tenant or to the platform (`owner`). Calls made for a client pass
its principal (`who`): a tenant sees its own deployments and the platform's, changes only its
own, and deploys only versions it may see; another tenant's are NOT_FOUND. The leader's own
writes (a job's result deployed) pass none.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from maas.mesh.authz import Principal
from maas.mesh.clients import RegistryClient
from maas.mesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from maas.mesh.etcd import EtcdSession
from maas.mesh.names import validate_name
from maas.mesh.service_classes import RESERVABLE, reserved_replicas
from maas.v1 import registry_pb2, scheduler_pb2

MAX_REPLICAS = 256


def _missing(name: str) -> str:
    return f"deployment {name!r} does not exist"


def _may_see(who: Principal | None, dep: scheduler_pb2.Deployment) -> bool:
    return who is None or who.may_see(dep.owner)


def _check_change(who: Principal | None, dep: scheduler_pb2.Deployment) -> None:
    if who is None:
        return
    if not who.may_see(dep.owner):
        raise NotFound(_missing(dep.name))
    if not who.may_change(dep.owner):
        raise PermissionDenied(f"deployment {dep.name!r} belongs to the platform; only the admin may change it")


def lowest(dep: scheduler_pb2.Deployment) -> int:
    """The fewest replicas an autoscaled deployment may have: its minimum, or what its
    reservations need if that is more."""
    return max(dep.autoscale.min_replicas, reserved_replicas(dep))


def _view(dep: scheduler_pb2.Deployment, who: Principal | None) -> scheduler_pb2.Deployment:
    """A deployment as `who` sees it: a tenant sees its own reservation, not other tenants'."""
    if who is None or who.kind != "tenant" or not dep.reservations:
        return dep
    shown = scheduler_pb2.Deployment()
    shown.CopyFrom(dep)
    shown.reservations.clear()
    if who.tenant in dep.reservations:
        shown.reservations[who.tenant] = dep.reservations[who.tenant]
    return shown


def _check_pipeline_deployment(dep: scheduler_pb2.Deployment) -> None:
    """A pipeline deployment has no replicas of its own: the routers run it, and its steps
    call models that are deployed on their own."""
    if dep.HasField("autoscale") or dep.HasField("resources") or dep.selector or dep.adapters:
        raise InvalidArgument(f"deployment {dep.name!r} runs pipeline {dep.resolved_version}, which the routers "
                              "run: it takes no autoscale, resources, selector or adapters (deploy the models its "
                              "steps call for those)", field="model")
    dep.replicas = 0


class DeploymentStore:
    def __init__(self, session: EtcdSession, resolver: RegistryClient) -> None:
        self.session = session
        self.resolver = resolver

    async def _resolve(self, ref: str, who: Principal | None) -> registry_pb2.ModelVersion:
        """The version `ref` names, if `who` may see it (the registry answers the scheduler
        for any tenant, so the tenant's view is applied here)."""
        version = await self.resolver.resolve(ref)
        if who is not None and not who.may_see(version.owner):
            raise NotFound(f"model {ref.partition('@')[0]!r} is not registered")
        if version.format == "index":
            raise FailedPrecondition(f"{version.name}@{version.version} is a vector index: pipelines' retrieve steps "
                                     "read it in the routers; it is not deployed")
        return version

    async def _prepare(self, dep: scheduler_pb2.Deployment, who: Principal | None = None) -> scheduler_pb2.Deployment:
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
        if floor := reserved_replicas(out):  # provisioned throughput holds replicas up
            if out.HasField("autoscale"):  # the autoscaler keeps it (`lowest`); its own minimum stays
                if out.autoscale.max_replicas < floor:
                    raise FailedPrecondition(f"the reservations on {dep.name!r} need {floor} replicas; autoscale "
                                             f"max_replicas {out.autoscale.max_replicas} is below that",
                                             field="max_replicas")
                out.replicas = max(out.replicas, floor)
            elif out.replicas < floor:
                raise FailedPrecondition(f"the reservations on {dep.name!r} need {floor} replicas, not "
                                         f"{out.replicas}: lower them first (maas deploy reserve)", field="replicas")
        out.model = dep.model or dep.name
        version = await self._resolve(out.model, who)
        out.resolved_version = f"{version.name}@{version.version}"
        out.format = "pipeline" if version.format == "pipeline" else ""
        if out.format == "pipeline":
            _check_pipeline_deployment(out)
        if len(out.traffic) > 1:
            raise InvalidArgument("one canary at a time: traffic takes at most one entry", field="traffic")
        for split in out.traffic:
            if not 1 <= split.weight <= 99:
                raise InvalidArgument(f"canary weight must be 1..99 percent, got {split.weight}", field="weight")
            canary = await self._resolve(split.model, who)
            split.model = f"{canary.name}@{canary.version}"
            if (canary.format == "pipeline") != (out.format == "pipeline"):
                raise InvalidArgument(f"the canary {split.model} is a {canary.format or 'model'} but deployment "
                                      f"{out.name!r} runs a {out.format or 'model'}: a canary is another version "
                                      "of the same kind", field="canary")
            if split.model == out.resolved_version:
                raise InvalidArgument(f"the canary {split.model} is the version already deployed", field="canary")
        served = {out.resolved_version, *(split.model for split in out.traffic)}
        for adapter in out.adapters:
            version = await self._resolve(adapter, who)
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

    async def create(self, dep: scheduler_pb2.Deployment, who: Principal | None = None) -> scheduler_pb2.Deployment:
        if who is not None and not who.is_admin:  # reservations are set with Reserve (a backup's restore keeps them)
            dep.reservations.clear()
            dep.replica_tokens_per_s = 0
        if who is not None and who.kind == "tenant":
            if dep.owner and dep.owner != who.tenant:
                raise PermissionDenied(f"{who.describe()} cannot create deployments for tenant {dep.owner!r}",
                                       field="owner")
            dep.owner = who.tenant
        dep = await self._prepare(dep, who)
        dep.created_ms = dep.updated_ms
        key, tx = self.session.keys.deployment(dep.name), self.session.client.transactions
        ok, _ = await self.session.client.transaction(
            compare=[tx.create(key) == 0], success=[tx.put(key, dep.SerializeToString())], failure=[])
        if not ok:
            raise AlreadyExists(f"deployment {dep.name!r} already exists; use update or scale")
        return dep

    async def update(self, dep: scheduler_pb2.Deployment, who: Principal | None = None) -> scheduler_pb2.Deployment:
        """Replace a deployment. An autoscaled one keeps the replica count the scheduler set
        (within the new bounds): a client's copy of it may be stale. Compared on the stored
        revision, so a concurrent write (the autoscaler's, a cold start's) is never lost."""
        def replace(wanted: scheduler_pb2.Deployment) -> bool:
            owner, reservations, capacity = wanted.owner, dict(wanted.reservations), wanted.replica_tokens_per_s
            wanted.CopyFrom(dep)
            wanted.reservations.clear()  # changed by Reserve only (a tenant's copy shows its own)
            wanted.reservations.update(reservations)
            wanted.replica_tokens_per_s = capacity
            wanted.owner = owner if who is None or who.kind == "tenant" or not dep.owner else dep.owner
            return True

        return await self.modify(dep.name, replace, who)

    async def modify(self, name: str, change: Callable[[scheduler_pb2.Deployment], bool],
                     who: Principal | None = None) -> scheduler_pb2.Deployment:
        """Read-modify-write the stored deployment: `change` edits a copy (returning False
        when there is nothing to change), compared on the revision it was read at, so a
        concurrent write (a user's, the autoscaler's, another job's adapter) is never
        overwritten: on a conflict `change` is applied again to what is stored now."""
        validate_name(name, "deployment")
        key, tx = self.session.keys.deployment(name), self.session.client.transactions
        for _ in range(10):
            got = await self.session.client.get(key)
            if got is None:
                raise NotFound(_missing(name))
            current = scheduler_pb2.Deployment.FromString(got.value)
            _check_change(who, current)
            wanted = scheduler_pb2.Deployment()
            wanted.CopyFrom(current)
            wanted.model = current.resolved_version  # an alias moving meanwhile must not roll it out
            if not change(wanted):
                return current
            out = await self._prepare(wanted, who)
            out.created_ms = current.created_ms
            if out.autoscale.max_replicas and current.autoscale.max_replicas:  # the scheduler's count stands
                out.replicas = min(out.autoscale.max_replicas, max(lowest(out), current.replicas))
            out.previous_version = (current.resolved_version if out.resolved_version != current.resolved_version
                                    else current.previous_version)
            ok, _ = await self.session.client.transaction(
                compare=[tx.mod(key) == got.mod_revision], success=[tx.put(key, out.SerializeToString())], failure=[])
            if ok:
                return out
        raise Unavailable(f"deployment {name!r} keeps changing; try again")

    async def get(self, name: str, who: Principal | None = None) -> scheduler_pb2.Deployment:
        validate_name(name, "deployment")
        raw = await self.session.get(self.session.keys.deployment(name))
        if raw is None:
            raise NotFound(_missing(name))
        dep = scheduler_pb2.Deployment.FromString(raw)
        if not _may_see(who, dep):
            raise NotFound(_missing(name))
        return _view(dep, who)

    async def list(self, who: Principal | None = None) -> list[scheduler_pb2.Deployment]:
        pairs, _ = await self.session.get_prefix(self.session.keys.deployments())
        return sorted((_view(d, who) for d in (scheduler_pb2.Deployment.FromString(v) for _, v in pairs)
                       if _may_see(who, d)), key=lambda d: d.name)

    async def replica_size(self, dep: scheduler_pb2.Deployment) -> tuple[int, int]:
        """(device memory over all its devices, devices) one replica of `dep` takes: its
        resources, else its version's."""
        version = await self._resolve(dep.resolved_version or dep.model, None)
        memory = dep.resources.memory_bytes or version.resources.memory_bytes
        return int(memory), max(1, dep.resources.devices or version.resources.devices)

    async def reserve(self, request: scheduler_pb2.ReserveRequest, room: Callable[[scheduler_pb2.Deployment], int],
                      who: Principal | None = None) -> scheduler_pb2.Deployment:
        """Set (0: remove) a tenant's reservation on a deployment and raise its replicas to
        what the reservations need; FailedPrecondition when the fleet cannot hold them
        (`room(dep)`: the replicas of `dep` that would fit beside everything placed)."""
        validate_name(request.tenant, "tenant")

        def reserving(wanted: scheduler_pb2.Deployment) -> bool:
            if wanted.format == "pipeline":
                raise FailedPrecondition(f"{wanted.name!r} is a pipeline: reserve throughput on the models it calls",
                                         field="deployment")
            if wanted.owner and wanted.owner != request.tenant:
                raise FailedPrecondition(f"deployment {wanted.name!r} belongs to tenant {wanted.owner!r}: reserve "
                                         "on the platform's deployments, or on the tenant's own", field="tenant")
            if request.replica_tokens_per_s:
                wanted.replica_tokens_per_s = request.replica_tokens_per_s
            if request.tokens_per_s:
                if not wanted.replica_tokens_per_s:
                    raise FailedPrecondition(f"what one replica of {wanted.name!r} makes is not known: give "
                                             "replica_tokens_per_s (measure it with bench/engine.py)",
                                             field="replica_tokens_per_s")
                wanted.reservations[request.tenant] = request.tokens_per_s
            elif request.tenant in wanted.reservations:
                del wanted.reservations[request.tenant]
            else:
                return False
            need = reserved_replicas(wanted)
            if need > wanted.replicas:
                can = wanted.replicas + room(wanted)
                if need > can:
                    total = sum(wanted.reservations.values())
                    raise FailedPrecondition(
                        f"reserving {total} tokens/s on {wanted.name!r} needs {need} replicas of "
                        f"{wanted.replica_tokens_per_s} tokens/s (reservations take at most {RESERVABLE:.0%} of "
                        f"each); the fleet can hold {can}", field="tokens_per_s")
                wanted.replicas = need
            return True

        return _view(await self.modify(request.deployment, reserving, who), who)

    async def delete(self, name: str, who: Principal | None = None) -> None:
        _check_change(who, await self.get(name, who))
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
