"""Scheduler gRPC servicer: a thin adapter over the deployment store and cluster state."""

from __future__ import annotations

import grpc

from maas.mesh.events import EventBus
from maas.services.scheduler.deployments import DeploymentStore
from maas.services.scheduler.reconciler import Reconciler
from maas.services.scheduler.state import ClusterState
from maas.v1 import scheduler_pb2, scheduler_pb2_grpc


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, store: DeploymentStore, state: ClusterState, reconciler: Reconciler,
                 events: EventBus) -> None:
        self.store = store
        self.state = state
        self.reconciler = reconciler
        self.events = events

    def _status(self, dep: scheduler_pb2.Deployment) -> scheduler_pb2.DeploymentStatus:
        status = self.state.status(dep)
        if reason := self.reconciler.unplaced.get(dep.name):
            status.message = reason
        return status

    def _changed(self, what: str, dep: scheduler_pb2.Deployment) -> None:
        self.events.publish("deployment", what, dep.name, f"{dep.name}: {dep.resolved_version} x{dep.replicas}",
                            model=dep.resolved_version, replicas=str(dep.replicas))

    async def CreateDeployment(self, request: scheduler_pb2.CreateDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        dep = await self.store.create(request.deployment)
        self._changed("created", dep)
        return self._status(dep)

    async def UpdateDeployment(self, request: scheduler_pb2.UpdateDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        dep = await self.store.update(request.deployment)
        self._changed("updated", dep)
        return self._status(dep)

    async def GetDeployment(self, request: scheduler_pb2.GetDeploymentRequest,
                            context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        return self._status(await self.store.get(request.name))

    async def ListDeployments(self, request: scheduler_pb2.ListDeploymentsRequest,
                              context: grpc.aio.ServicerContext) -> scheduler_pb2.ListDeploymentsResponse:
        return scheduler_pb2.ListDeploymentsResponse(deployments=[self._status(d) for d in await self.store.list()])

    async def DeleteDeployment(self, request: scheduler_pb2.DeleteDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> scheduler_pb2.DeleteDeploymentResponse:
        await self.store.delete(request.name)
        self.events.publish("deployment", "deleted", request.name, f"{request.name} deleted")
        return scheduler_pb2.DeleteDeploymentResponse()

    async def Activate(self, request: scheduler_pb2.ActivateRequest,
                       context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        dep, scaled = await self.store.activate(request.name)
        if scaled:
            self.events.publish("deployment", "activated", dep.name, f"{dep.name}: cold start from zero replicas",
                                replicas="1")
        return self._status(dep)

    async def ListWorkers(self, request: scheduler_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> scheduler_pb2.ListWorkersResponse:
        return scheduler_pb2.ListWorkersResponse(workers=self.state.worker_statuses())
