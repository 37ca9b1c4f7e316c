"""The scheduler's live view of the mesh: get-then-watch mirrors of the prefixes it reads."""

from __future__ import annotations

import asyncio

from maas.mesh.discovery import PrefixMirror
from maas.mesh.etcd import EtcdSession
from maas.v1 import jobs_pb2, mesh_pb2, scheduler_pb2


class ClusterState:
    def __init__(self, session: EtcdSession) -> None:
        keys = session.keys
        self.session = session
        self.workers = PrefixMirror(session, keys.workers(), mesh_pb2.WorkerInfo)
        self.replicas = PrefixMirror(session, keys.replicas(), mesh_pb2.ReplicaInfo)
        self.assignments = PrefixMirror(session, keys.assignments(), mesh_pb2.Assignment)
        self.deployments = PrefixMirror(session, keys.deployments(), scheduler_pb2.Deployment)
        self.jobs = PrefixMirror(session, keys.jobs(), jobs_pb2.Job)
        self.mirrors = (self.workers, self.replicas, self.assignments, self.deployments, self.jobs)
        self.changed = asyncio.Event()
        for m in (self.workers, self.replicas, self.assignments, self.deployments):
            m.add_listener(lambda *_: self.changed.set())
        self.jobs.add_listener(self._on_job)

    def _on_job(self, job_id: str, old: jobs_pb2.Job | None, new: jobs_pb2.Job | None) -> None:
        """Plan again when a job changes in a way placement cares about; not for each of
        the progress reports its worker writes."""
        if old is None or new is None or _placement_view(old) != _placement_view(new):
            self.changed.set()

    async def start(self) -> None:
        for m in self.mirrors:
            await m.start()

    async def close(self) -> None:
        for m in self.mirrors:
            await m.close()

    def assignments_by_worker(self) -> dict[tuple[str, str], mesh_pb2.Assignment]:
        out = {}
        for key, a in self.assignments.items.items():
            worker, _, replica = key.partition("/")
            out[(worker, replica)] = a
        return out

    def worker_statuses(self) -> list[scheduler_pb2.WorkerStatus]:
        assigned: dict[str, int] = {}
        for (worker, _), a in self.assignments_by_worker().items():
            assigned[worker] = assigned.get(worker, 0) + a.memory_bytes
        return [scheduler_pb2.WorkerStatus(
                    worker=info, memory_assigned_bytes=assigned.get(wid, 0),
                    replicas=[r for r in self.replicas.items.values() if r.worker_id == wid])
                for wid, info in sorted(self.workers.items.items())]

    def status(self, deployment: scheduler_pb2.Deployment) -> scheduler_pb2.DeploymentStatus:
        replicas = sorted((r for r in self.replicas.items.values() if r.deployment == deployment.name),
                          key=lambda r: r.replica_id)
        ready = sum(r.state == mesh_pb2.REPLICA_STATE_READY for r in replicas)
        assigned = sum(a.deployment == deployment.name for a in self.assignments.items.values())
        if ready >= deployment.replicas:
            message = ""
        elif failed := [r for r in replicas if r.state == mesh_pb2.REPLICA_STATE_FAILED]:
            message = f"replica {failed[0].replica_id} failed: {failed[0].message}"
        elif assigned < deployment.replicas:
            message = f"{assigned} of {deployment.replicas} replicas placed; waiting for a worker with room"
        else:
            message = f"{ready} of {deployment.replicas} replicas ready; loading"
        return scheduler_pb2.DeploymentStatus(deployment=deployment, replicas=replicas,
                                              ready_replicas=ready, message=message)


def _placement_view(job: jobs_pb2.Job) -> tuple[object, ...]:
    return (job.state, job.worker_id, job.cancel_requested, job.yield_requested, job.result, job.deployment)
