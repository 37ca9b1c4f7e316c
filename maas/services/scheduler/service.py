"""Scheduler gRPC servicer: deployments API. Any instance serves it; only the leader places."""

from __future__ import annotations

import time

import grpc

from maas.mesh.errors import AlreadyExists, InvalidArgument, NotFound
from maas.mesh.etcd import EtcdSession
from maas.mesh.events import EventBus
from maas.services.registry.store import validate_name
from maas.services.scheduler.reconciler import Reconciler
from maas.services.scheduler.state import ClusterState, VersionResolver
from maas.v1 import scheduler_pb2, scheduler_pb2_grpc

MAX_REPLICAS = 256


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, session: EtcdSession, state: ClusterState, resolver: VersionResolver,
                 reconciler: Reconciler, events: EventBus) -> None:
        self.session = session
        self.state = state
        self.resolver = resolver
        self.reconciler = reconciler
        self.events = events

    async def _prepare(self, dep: scheduler_pb2.Deployment) -> scheduler_pb2.Deployment:
        validate_name(dep.name, "deployment")
        if dep.replicas > MAX_REPLICAS:
            raise InvalidArgument(f"replicas must be <= {MAX_REPLICAS}", field="replicas")
        out = scheduler_pb2.Deployment()
        out.CopyFrom(dep)
        out.model = dep.model or dep.name
        version = await self.resolver.resolve(out.model)
        out.resolved_version = f"{version.name}@{version.version}"
        out.updated_ms = int(time.time() * 1000)
        return out

    def _status(self, dep: scheduler_pb2.Deployment) -> scheduler_pb2.DeploymentStatus:
        status = self.state.status(dep)
        if reason := self.reconciler.unplaced.get(dep.name):
            status.message = reason
        return status

    async def CreateDeployment(self, request: scheduler_pb2.CreateDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        dep = await self._prepare(request.deployment)
        dep.created_ms = dep.updated_ms
        key, tx = self.session.keys.deployment(dep.name), self.session.client.transactions
        ok, _ = await self.session.client.transaction(
            compare=[tx.create(key) == 0], success=[tx.put(key, dep.SerializeToString())], failure=[])
        if not ok:
            raise AlreadyExists(f"deployment {dep.name!r} already exists; use update or scale")
        self.events.publish("deployment", "created", dep.name,
                            f"{dep.name}: {dep.resolved_version} x{dep.replicas}", model=dep.resolved_version,
                            replicas=str(dep.replicas))
        return self._status(dep)

    async def UpdateDeployment(self, request: scheduler_pb2.UpdateDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        current = await self._get(request.deployment.name)
        dep = await self._prepare(request.deployment)
        dep.created_ms = current.created_ms
        await self.session.client.put(self.session.keys.deployment(dep.name), dep.SerializeToString())
        self.events.publish("deployment", "updated", dep.name,
                            f"{dep.name}: {dep.resolved_version} x{dep.replicas}", model=dep.resolved_version,
                            replicas=str(dep.replicas))
        return self._status(dep)

    async def _get(self, name: str) -> scheduler_pb2.Deployment:
        """Read from etcd, not the mirror: a client sees its own writes at once."""
        validate_name(name, "deployment")
        raw = await self.session.get(self.session.keys.deployment(name))
        if raw is None:
            raise NotFound(f"deployment {name!r} does not exist")
        return scheduler_pb2.Deployment.FromString(raw)

    async def GetDeployment(self, request: scheduler_pb2.GetDeploymentRequest,
                            context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        return self._status(await self._get(request.name))

    async def ListDeployments(self, request: scheduler_pb2.ListDeploymentsRequest,
                              context: grpc.aio.ServicerContext) -> scheduler_pb2.ListDeploymentsResponse:
        pairs, _ = await self.session.get_prefix(self.session.keys.deployments())
        deps = sorted((scheduler_pb2.Deployment.FromString(v) for _, v in pairs), key=lambda d: d.name)
        return scheduler_pb2.ListDeploymentsResponse(deployments=[self._status(d) for d in deps])

    async def DeleteDeployment(self, request: scheduler_pb2.DeleteDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> scheduler_pb2.DeleteDeploymentResponse:
        await self._get(request.name)
        await self.session.client.delete(self.session.keys.deployment(request.name))
        self.events.publish("deployment", "deleted", request.name, f"{request.name} deleted")
        return scheduler_pb2.DeleteDeploymentResponse()

    async def ListWorkers(self, request: scheduler_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> scheduler_pb2.ListWorkersResponse:
        out = []
        assignments = self.state.assignments_by_worker()
        for wid, info in sorted(self.state.workers.items.items()):
            replicas = [r for r in self.state.replicas.items.values() if r.worker_id == wid]
            assigned = sum(a.memory_bytes for (w, _), a in assignments.items() if w == wid)
            out.append(scheduler_pb2.WorkerStatus(worker=info, replicas=replicas, memory_assigned_bytes=assigned))
        return scheduler_pb2.ListWorkersResponse(workers=out)
