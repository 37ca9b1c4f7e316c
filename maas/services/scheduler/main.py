"""`maas scheduler`: run one scheduler instance (leader or standby)."""

from __future__ import annotations

import argparse

from maas.mesh.clients import RegistryClient
from maas.mesh.config import MeshConfig
from maas.mesh.errors import StartupError
from maas.mesh.logs import setup_logging
from maas.mesh.server import ServiceRuntime, run_service
from maas.services.scheduler import metrics
from maas.services.scheduler.deployments import DeploymentStore
from maas.services.scheduler.jobs import MAX_JOBS_PER_TENANT, MAX_RUNNING_PER_TENANT, JobStore
from maas.services.scheduler.reconciler import EVICT_IDLE_SECONDS, JOB_RETENTION_SECONDS, Reconciler
from maas.services.scheduler.service import SchedulerServicer
from maas.services.scheduler.state import ClusterState
from maas.v1 import scheduler_pb2, scheduler_pb2_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    MeshConfig.add_arguments(parser)
    parser.add_argument("--evict-idle-seconds", type=float, default=EVICT_IDLE_SECONDS,
                        help="a replica of an autoscaled deployment unused this long may be unloaded "
                             "to make room for another model (least recently used first)")
    parser.add_argument("--max-jobs-per-tenant", type=int, default=MAX_JOBS_PER_TENANT,
                        help="fine-tuning jobs a tenant may have queued or running")
    parser.add_argument("--max-running-jobs-per-tenant", type=int, default=MAX_RUNNING_PER_TENANT,
                        help="fine-tuning jobs of one tenant that run at once (the rest wait in the queue)")
    parser.add_argument("--job-retention-hours", type=float, default=JOB_RETENTION_SECONDS / 3600,
                        help="finished fine-tuning jobs are listed this long, then forgotten (results stay)")


async def build(rt: ServiceRuntime, *, evict_idle_seconds: float = EVICT_IDLE_SECONDS,
                max_jobs_per_tenant: int = MAX_JOBS_PER_TENANT,
                max_running_jobs_per_tenant: int = MAX_RUNNING_PER_TENANT,
                job_retention_seconds: float = JOB_RETENTION_SECONDS) -> Reconciler:
    """Wire the scheduler into a runtime (also used by in-process tests)."""
    if max_jobs_per_tenant < 1 or max_running_jobs_per_tenant < 0 or not job_retention_seconds > 0:
        raise StartupError("--max-jobs-per-tenant must be at least 1, --max-running-jobs-per-tenant at least 0 "
                           "(0: no limit) and --job-retention-hours more than 0")
    state = ClusterState(rt.etcd)
    resolver = RegistryClient(rt.etcd)
    deployments = DeploymentStore(rt.etcd, resolver)
    reconciler = Reconciler(rt, state, resolver, evict_idle_seconds=evict_idle_seconds, deployments=deployments,
                            max_running_jobs_per_tenant=max_running_jobs_per_tenant,
                            job_retention_seconds=job_retention_seconds)
    rt.gauge("maas_scheduler_leader", "1 on the scheduler that holds the leadership (writes placements), else 0",
             [], lambda: {(): 1.0 if reconciler.is_leader else 0.0})
    rt.gauge(metrics.JOBS, metrics.JOBS_DOC, ["state"], lambda: metrics.job_counts(list(state.jobs.items.values())))
    rt.gauge(metrics.PENDING, metrics.PENDING_DOC, [], lambda: metrics.pending_replicas(
        list(state.deployments.items.values()), list(state.assignments.items.values())))
    rt.add_service(scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
                   scheduler_pb2_grpc.add_SchedulerServicer_to_server,
                   SchedulerServicer(deployments, state, reconciler, rt.events,
                                     JobStore(rt.etcd, resolver, max_jobs_per_tenant=max_jobs_per_tenant)))
    rt.before_stop(reconciler.close)
    rt.add_closer(state.close)
    rt.add_closer(resolver.close)
    await rt.start()
    await state.start()
    await reconciler.start()
    return reconciler


def main(ns: argparse.Namespace) -> int:
    config = MeshConfig.from_args("scheduler", ns)
    setup_logging(config.log_level, json_output=config.log_json, name="scheduler", instance=config.instance)

    async def serve() -> None:
        async with ServiceRuntime(config) as rt:
            await build(rt, evict_idle_seconds=ns.evict_idle_seconds, max_jobs_per_tenant=ns.max_jobs_per_tenant,
                        max_running_jobs_per_tenant=ns.max_running_jobs_per_tenant,
                        job_retention_seconds=ns.job_retention_hours * 3600)
            await rt.wait()

    return run_service(serve)
