"""Scheduler gRPC servicer: a thin adapter over the deployment store and cluster state."""

from __future__ import annotations

import grpc

from maas.mesh.authz import caller
from maas.mesh.events import EventBus
from maas.mesh.jobs import state_name
from maas.services.scheduler.deployments import MAX_REPLICAS, DeploymentStore
from maas.services.scheduler.jobs import JobStore
from maas.services.scheduler.placement import Fleet
from maas.services.scheduler.reconciler import Reconciler
from maas.services.scheduler.state import ClusterState
from maas.v1 import jobs_pb2, scheduler_pb2, scheduler_pb2_grpc


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, store: DeploymentStore, state: ClusterState, reconciler: Reconciler,
                 events: EventBus, jobs: JobStore) -> None:
        self.store = store
        self.jobs = jobs
        self.state = state
        self.reconciler = reconciler
        self.events = events

    def _status(self, dep: scheduler_pb2.Deployment) -> scheduler_pb2.DeploymentStatus:
        status = self.state.status(dep)
        if dep.format == "pipeline":
            status.message = "a pipeline: the routers run it (its steps call models deployed on their own)"
        elif reason := self.reconciler.unplaced.get(dep.name):
            status.message = reason
        return status

    def _changed(self, what: str, dep: scheduler_pb2.Deployment) -> None:
        self.events.publish("deployment", what, dep.name, f"{dep.name}: {dep.resolved_version} x{dep.replicas}",
                            model=dep.resolved_version, replicas=str(dep.replicas))

    async def CreateDeployment(self, request: scheduler_pb2.CreateDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        dep = await self.store.create(request.deployment, caller())
        self._changed("created", dep)
        return self._status(dep)

    async def UpdateDeployment(self, request: scheduler_pb2.UpdateDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        dep = await self.store.update(request.deployment, caller())
        self._changed("updated", dep)
        return self._status(dep)

    async def GetDeployment(self, request: scheduler_pb2.GetDeploymentRequest,
                            context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        return self._status(await self.store.get(request.name, caller()))

    async def ListDeployments(self, request: scheduler_pb2.ListDeploymentsRequest,
                              context: grpc.aio.ServicerContext) -> scheduler_pb2.ListDeploymentsResponse:
        return scheduler_pb2.ListDeploymentsResponse(deployments=[self._status(d) for d in await self.store.list(caller())])

    async def DeleteDeployment(self, request: scheduler_pb2.DeleteDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> scheduler_pb2.DeleteDeploymentResponse:
        await self.store.delete(request.name, caller())
        self.events.publish("deployment", "deleted", request.name, f"{request.name} deleted")
        return scheduler_pb2.DeleteDeploymentResponse()

    async def Activate(self, request: scheduler_pb2.ActivateRequest,
                       context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        dep, scaled = await self.store.activate(request.name)
        if scaled:
            self.events.publish("deployment", "activated", dep.name, f"{dep.name}: cold start from zero replicas",
                                replicas="1")
        return self._status(dep)

    async def Reserve(self, request: scheduler_pb2.ReserveRequest,
                      context: grpc.aio.ServicerContext) -> scheduler_pb2.DeploymentStatus:
        current = await self.store.get(request.deployment, caller())
        need, devices = await self.store.replica_size(current)
        dep = await self.store.reserve(request, lambda d: self._room(d, need, devices), caller())
        self.events.publish("deployment", "reserved", dep.name,
                            f"{dep.name}: {request.tokens_per_s} tokens/s reserved for tenant {request.tenant} "
                            f"(x{dep.replicas} replicas)", tenant=request.tenant, tokens_per_s=str(request.tokens_per_s))
        return self._status(dep)

    def _room(self, dep: scheduler_pb2.Deployment, need: int, devices: int) -> int:
        """How many more replicas of `dep` (`need` bytes over `devices` devices of one worker)
        the fleet holds: on the workers its selector admits, beside every replica placed and
        every running job, less its own replicas not placed yet. A model without a memory
        estimate fits anywhere, as placement treats it."""
        if not need:
            return MAX_REPLICAS
        per_device = -(-need // devices)
        placed = self.state.assignments_by_worker()
        fleet = Fleet(dict(self.state.workers.items))
        for (worker, _), a in placed.items():
            for device in a.device_ids:
                fleet.take((worker, device), a.memory_bytes)
        for job in self.state.jobs.items.values():
            if job.state == jobs_pb2.JOB_STATE_RUNNING:
                for device in job.device_ids or [job.device_id]:
                    fleet.take((job.worker_id, device), job.memory_bytes)
        room = 0
        for worker, info in self.state.workers.items.items():
            if any(info.labels.get(k) != v for k, v in dep.selector.items()):
                continue
            pieces = sum(max(0, fleet.free.get((worker, d.id), 0)) // per_device for d in info.devices)
            room += pieces // devices
        mine = sum(1 for a in placed.values() if a.deployment == dep.name)
        return max(0, room - max(0, dep.replicas - mine))

    async def ListWorkers(self, request: scheduler_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> scheduler_pb2.ListWorkersResponse:
        return scheduler_pb2.ListWorkersResponse(workers=self.state.worker_statuses())

    # -- fine-tuning jobs --

    async def CreateJob(self, request: jobs_pb2.CreateJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        job = await self.jobs.create(request.spec)
        spec = job.spec
        self.events.publish("job", "queued", job.id,
                            f"{job.id}: {spec.method} on {spec.base}, {job.examples} examples -> {spec.name}",
                            base=spec.base, tenant=spec.tenant, priority=str(spec.priority), name=spec.name)
        return job

    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        return await self.jobs.get(request.id)

    async def ListJobs(self, request: jobs_pb2.ListJobsRequest,
                       context: grpc.aio.ServicerContext) -> jobs_pb2.ListJobsResponse:
        return jobs_pb2.ListJobsResponse(jobs=await self.jobs.visible(request.tenant, request.active))

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        job, changed = await self.jobs.cancel(request.id)
        if changed:
            what = "cancelled" if job.state == jobs_pb2.JOB_STATE_CANCELLED else "cancelling"
            self.events.publish("job", what, job.id, f"{job.id}: {job.message}", state=state_name(job.state))
        return job
