"""Registry gRPC servicer: converts requests, awaits the store, publishes events."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc

from maas.mesh import usage
from maas.mesh.artifacts import CHUNK, check_digest
from maas.mesh.authz import caller
from maas.mesh.errors import FailedPrecondition, InvalidArgument
from maas.mesh.events import EventBus
from maas.services.registry import backup
from maas.services.registry.apikeys import KeyStore
from maas.services.registry.blobs import BlobStore
from maas.services.registry.store import ModelStore
from maas.v1 import registry_pb2, registry_pb2_grpc, usage_pb2


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, store: ModelStore, blobs: BlobStore, events: EventBus, keys: KeyStore) -> None:
        self.store = store
        self.blobs = blobs
        self.events = events
        self.keys = keys

    async def CreateKey(self, request: registry_pb2.CreateKeyRequest,
                        context: grpc.aio.ServicerContext) -> registry_pb2.CreateKeyResponse:
        created = await self.keys.create(request)
        info = created.info
        self.events.publish("key", "created", info.id, f"key {info.id} for tenant {info.tenant}", tenant=info.tenant)
        return created

    async def ListKeys(self, request: registry_pb2.ListKeysRequest,
                       context: grpc.aio.ServicerContext) -> registry_pb2.ListKeysResponse:
        return registry_pb2.ListKeysResponse(keys=await self.keys.list(request.tenant))

    async def RevokeKey(self, request: registry_pb2.RevokeKeyRequest,
                        context: grpc.aio.ServicerContext) -> registry_pb2.RevokeKeyResponse:
        info = await self.keys.revoke(request.id)
        self.events.publish("key", "revoked", info.id, f"key {info.id} of tenant {info.tenant} revoked",
                            tenant=info.tenant)
        return registry_pb2.RevokeKeyResponse()

    async def RegisterModel(self, request: registry_pb2.RegisterModelRequest,
                            context: grpc.aio.ServicerContext) -> registry_pb2.ModelVersion:
        version = await self.store.register(request)
        ref = f"{version.name}@{version.version}"
        self.events.publish("model", "registered", ref, f"registered {ref} ({version.format}: {version.source})",
                            format=version.format, source=version.source)
        return version

    async def GetModel(self, request: registry_pb2.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> registry_pb2.Model:
        return await self.store.get_model(request.name)

    async def ListModels(self, request: registry_pb2.ListRegisteredModelsRequest,
                         context: grpc.aio.ServicerContext) -> registry_pb2.ListRegisteredModelsResponse:
        return registry_pb2.ListRegisteredModelsResponse(models=await self.store.list_models())

    async def GetVersion(self, request: registry_pb2.GetVersionRequest,
                         context: grpc.aio.ServicerContext) -> registry_pb2.ModelVersion:
        return await self.store.resolve(request.ref)

    async def ListVersions(self, request: registry_pb2.ListVersionsRequest,
                           context: grpc.aio.ServicerContext) -> registry_pb2.ListVersionsResponse:
        return registry_pb2.ListVersionsResponse(versions=await self.store.list_versions(request.name))

    async def SetAlias(self, request: registry_pb2.SetAliasRequest,
                       context: grpc.aio.ServicerContext) -> registry_pb2.Model:
        model = await self.store.set_alias(request.name, request.alias, request.version)
        self.events.publish("model", "aliased", f"{request.name}@{request.alias}",
                            f"{request.name}@{request.alias} -> {request.version}")
        return model

    async def DeleteVersion(self, request: registry_pb2.DeleteVersionRequest,
                            context: grpc.aio.ServicerContext) -> registry_pb2.DeleteVersionResponse:
        await self.store.delete_version(request.name, request.version)
        ref = f"{request.name}@{request.version}"
        self.events.publish("model", "deleted", ref, f"deleted {ref}")
        return registry_pb2.DeleteVersionResponse()

    async def UploadArtifact(self, request_iterator: AsyncIterator[registry_pb2.ArtifactChunk],
                             context: grpc.aio.ServicerContext) -> registry_pb2.Artifact:
        writer = self.blobs.writer()
        expected = ""
        try:
            first = True
            async for chunk in request_iterator:
                if first and chunk.sha256:
                    expected = check_digest(chunk.sha256)
                first = False
                await asyncio.to_thread(writer.write, chunk.data)
            sha, size = await asyncio.to_thread(writer.commit, expected)
        except BaseException:
            writer.abort()
            raise
        await self.store.uploaded(sha)
        self.events.publish("artifact", "uploaded", sha, f"artifact {sha[:12]} ({size} bytes)", size=str(size))
        return registry_pb2.Artifact(sha256=sha, size_bytes=size)

    async def DownloadArtifact(self, request: registry_pb2.DownloadArtifactRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[registry_pb2.ArtifactChunk]:
        await self.store.check_artifact(check_digest(request.sha256))
        size = await asyncio.to_thread(self.blobs.size, request.sha256)
        chunks = self.blobs.read(request.sha256)
        first = True
        while (data := await asyncio.to_thread(next, chunks, None)) is not None:
            yield registry_pb2.ArtifactChunk(data=data, sha256=request.sha256 if first else "",
                                             total_bytes=size if first else 0)
            first = False

    async def DeleteArtifact(self, request: registry_pb2.DeleteArtifactRequest,
                             context: grpc.aio.ServicerContext) -> registry_pb2.DeleteArtifactResponse:
        sha = check_digest(request.sha256)
        if user := await self.store.artifact_user(sha):
            raise FailedPrecondition(f"artifact {sha[:12]} is used by {user}; it stays")
        size = await asyncio.to_thread(self.blobs.delete, sha)
        self.events.publish("artifact", "deleted", sha, f"artifact {sha[:12]} deleted ({size} bytes)", size=str(size))
        return registry_pb2.DeleteArtifactResponse(size_bytes=size)

    async def Backup(self, request: registry_pb2.BackupRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[registry_pb2.BackupChunk]:
        snapshot = await backup.take(self.store.session, self.blobs)
        data = await asyncio.to_thread(snapshot.encode)
        counts = snapshot.counts()
        self.events.publish("backup", "created", str(snapshot.etcd_revision),
                            f"backup of {snapshot.prefix} at etcd revision {snapshot.etcd_revision}: "
                            f"{counts.keys} keys, {counts.artifacts} artifacts", bytes=str(len(data)))
        yield registry_pb2.BackupChunk(
            data=data[:CHUNK], total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
            etcd_revision=snapshot.etcd_revision, counts=counts, format=backup.FORMAT, prefix=snapshot.prefix,
            missing_artifacts=[a.digest for a in snapshot.artifacts if a.size is None])
        for i in range(CHUNK, len(data), CHUNK):
            yield registry_pb2.BackupChunk(data=data[i:i + CHUNK])

    async def Restore(self, request_iterator: AsyncIterator[registry_pb2.RestoreChunk],
                      context: grpc.aio.ServicerContext) -> registry_pb2.RestoreResponse:
        first: registry_pb2.RestoreChunk | None = None
        data = bytearray()
        async for chunk in request_iterator:
            first = first or chunk
            data += chunk.data
            if len(data) > backup.MAX_BACKUP_BYTES:
                raise InvalidArgument(f"the backup file is larger than {backup.MAX_BACKUP_BYTES} bytes")
        if first is None:
            raise InvalidArgument("no backup file was sent")
        snapshot = await asyncio.to_thread(backup.Backup.decode, bytes(data))
        response = await backup.restore(self.store.session, self.blobs, snapshot, force=first.force,
                                        allow_missing_artifacts=first.allow_missing_artifacts)
        c = response.counts
        self.events.publish("backup", "restored", str(snapshot.etcd_revision),
                            f"restored {c.keys} keys ({c.models} models, {c.versions} versions, {c.deployments} "
                            f"deployments) from a backup of {snapshot.prefix} at etcd revision "
                            f"{snapshot.etcd_revision}", missing_artifacts=str(len(response.missing_artifacts)))
        return response

    async def GetUsage(self, request: usage_pb2.GetUsageRequest,
                       context: grpc.aio.ServicerContext) -> usage_pb2.GetUsageResponse:
        """Usage from the MAAS_USAGE stream, through the event bus's NATS connection."""
        return await usage.answer(request, caller(), self.events.nc, self.store.session.config.prefix)
