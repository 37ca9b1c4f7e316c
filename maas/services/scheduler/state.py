"""The scheduler's live view of the mesh: get-then-watch mirrors of the prefixes it reads."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from maas.mesh.clients import dial, pick_endpoint
from maas.mesh.discovery import PrefixMirror
from maas.mesh.errors import InvalidArgument, NotFound, Unavailable
from maas.mesh.etcd import EtcdSession
from maas.v1 import mesh_pb2, registry_pb2, registry_pb2_grpc, scheduler_pb2


class ClusterState:
    def __init__(self, session: EtcdSession) -> None:
        keys = session.keys
        self.session = session
        self.workers = PrefixMirror(session, keys.workers(), mesh_pb2.WorkerInfo)
        self.replicas = PrefixMirror(session, keys.replicas(), mesh_pb2.ReplicaInfo)
        self.assignments = PrefixMirror(session, keys.assignments(), mesh_pb2.Assignment)
        self.deployments = PrefixMirror(session, keys.deployments(), scheduler_pb2.Deployment)
        self.mirrors = (self.workers, self.replicas, self.assignments, self.deployments)
        self.changed = asyncio.Event()
        for m in self.mirrors:
            m.add_listener(lambda *_: self.changed.set())

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


class VersionResolver:
    """Resolves model refs through the registry (found in etcd). Versions are immutable, so a
    resolved "name@N" is cached for good."""

    def __init__(self, session: EtcdSession) -> None:
        self.session = session
        self._cache: dict[str, registry_pb2.ModelVersion] = {}
        self._channel: grpc.aio.Channel | None = None

    async def resolve(self, ref: str, *, timeout: float = 5.0) -> registry_pb2.ModelVersion:
        if ref in self._cache:
            return self._cache[ref]
        for attempt in range(2):
            if self._channel is None:
                self._channel = dial(await pick_endpoint(self.session.client, self.session.keys, "registry"))
            try:
                version = await registry_pb2_grpc.RegistryStub(self._channel).GetVersion(
                    registry_pb2.GetVersionRequest(ref=ref), timeout=timeout)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    raise NotFound(e.details() or f"model {ref!r} not found") from None
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(e.details() or "invalid model reference", field="model") from None
                await self.close()
                if attempt:
                    raise Unavailable(f"registry unavailable: {e.details()}") from None
        resolved = f"{version.name}@{version.version}"
        self._cache[resolved] = version
        return version

    async def close(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
            self._channel = None
