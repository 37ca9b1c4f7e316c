"""Files (docs/batches.md): what tenants upload for batches, and what batches write back.

A file is a record at `files/{id}` naming its owner and the artifact (sha256) that holds
its bytes, so two files with the same bytes share one blob. A tenant sees and deletes only
its own files (another tenant's is NOT_FOUND, as a missing one); the admin sees every
file. A router calls for a tenant: it names the tenant in `on_behalf_of` (reads) or in the
first chunk (uploads), and may give a batch's output a fixed id, so that a batch finished
twice (its router died while finishing) writes one file.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator

import grpc

from maas.mesh.artifacts import CHUNK
from maas.mesh.authz import Principal, caller
from maas.mesh.batches import MAX_FILE_BYTES, MAX_OUTPUT_BYTES, PURPOSES, SERVICE_PURPOSES, TERMINAL
from maas.mesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from maas.mesh.etcd import EtcdSession
from maas.mesh.events import EventBus
from maas.services.registry.blobs import BlobStore
from maas.services.registry.store import ModelStore
from maas.v1 import batches_pb2, batches_pb2_grpc

FILE_ID = re.compile(r"file-[0-9a-zA-Z_-]{1,64}")


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def check_file_id(file_id: str) -> str:
    if not FILE_ID.fullmatch(file_id):
        raise InvalidArgument(f"{file_id[:80]!r} is not a file id (file-...)", field="file_id")
    return file_id


def _filename(name: str) -> str:
    """The name as given, without directories or control characters, at most 255 characters."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:255]
    return name or "upload"


def viewer(me: Principal, on_behalf_of: str) -> str | None:
    """Whose files the caller sees: a tenant its own; a router or the admin acting for a
    tenant that tenant's; the admin (or a service) on its own everything (None)."""
    if me.kind == "tenant":
        return me.tenant
    return on_behalf_of or None


class FilesServicer(batches_pb2_grpc.FilesServicer):
    def __init__(self, session: EtcdSession, blobs: BlobStore, store: ModelStore, events: EventBus) -> None:
        self.session = session
        self.blobs = blobs
        self.store = store
        self.events = events

    async def _get(self, file_id: str, on_behalf_of: str) -> batches_pb2.File:
        raw = await self.session.get(self.session.keys.file(check_file_id(file_id)))
        view = viewer(caller(), on_behalf_of)
        if raw is None:
            raise NotFound(f"file {file_id!r} does not exist", field="file_id")
        record = batches_pb2.File.FromString(raw)
        if view is not None and record.tenant != view:
            raise NotFound(f"file {file_id!r} does not exist", field="file_id")
        return record

    async def UploadFile(self, request_iterator: AsyncIterator[batches_pb2.FileChunk],
                         context: grpc.aio.ServicerContext) -> batches_pb2.File:
        me = caller()
        writer = self.blobs.writer()
        header: batches_pb2.FileChunk | None = None
        size = lines = 0
        limit = MAX_FILE_BYTES
        last = b"\n"
        try:
            async for chunk in request_iterator:
                if header is None:
                    header = chunk
                    self._check_header(me, chunk)
                    limit = MAX_OUTPUT_BYTES if chunk.purpose in SERVICE_PURPOSES else MAX_FILE_BYTES
                size += len(chunk.data)
                if size > limit:
                    raise InvalidArgument(f"the file is larger than {limit // (1024 * 1024)} MiB")
                if chunk.data:
                    lines += chunk.data.count(b"\n")
                    last = chunk.data[-1:]
                    await asyncio.to_thread(writer.write, chunk.data)
            if header is None:
                raise InvalidArgument("the upload sent no chunk: the first one names the purpose and filename")
            sha, size = await asyncio.to_thread(writer.commit, "")
        except BaseException:
            writer.abort()
            raise
        if last != b"\n":
            lines += 1  # a last line without its newline
        record = batches_pb2.File(
            id=header.id or new_file_id(), tenant=header.tenant if me.kind != "tenant" else me.tenant,
            purpose=header.purpose, filename=_filename(header.filename), bytes=size, sha256=sha,
            created_ms=int(time.time() * 1000), lines=lines)
        key, tx = self.session.keys.file(record.id), self.session.client.transactions
        ok, _ = await self.session.client.transaction(
            compare=[tx.version(key) == 0], success=[tx.put(key, record.SerializeToString())], failure=[])
        if not ok:
            existing = batches_pb2.File.FromString(await self.session.get(key) or b"")
            if not header.id or existing.tenant != record.tenant:
                raise AlreadyExists(f"file {record.id!r} exists", field="file_id")
            # a batch's result written again (its router died while finishing): the new one stands
            await self.session.client.put(key, record.SerializeToString())
            if existing.sha256 != sha and not await self._still_used(existing.sha256):
                await asyncio.to_thread(self.blobs.delete, existing.sha256)
        self.events.publish("file", "uploaded", record.id, f"file {record.id} ({size} bytes, {record.purpose})",
                            tenant=record.tenant, purpose=record.purpose, size=str(size))
        return record

    @staticmethod
    def _check_header(me: Principal, chunk: batches_pb2.FileChunk) -> None:
        if chunk.purpose not in PURPOSES:
            raise InvalidArgument(f"purpose must be one of {', '.join(PURPOSES)}, not {chunk.purpose!r}",
                                  field="purpose")
        if me.kind == "tenant":
            if chunk.purpose in SERVICE_PURPOSES:
                raise InvalidArgument(f"purpose {chunk.purpose!r} is written by the platform; upload with "
                                      "purpose 'batch'", field="purpose")
            if chunk.id:
                raise PermissionDenied("only a router chooses a file's id", field="id")
            if chunk.tenant and chunk.tenant != me.tenant:
                raise PermissionDenied(f"{me.describe()} cannot upload files for tenant {chunk.tenant!r}",
                                       field="tenant")
        elif chunk.id:
            check_file_id(chunk.id)

    async def GetFile(self, request: batches_pb2.FileRequest,
                      context: grpc.aio.ServicerContext) -> batches_pb2.File:
        return await self._get(request.id, request.on_behalf_of)

    async def ListFiles(self, request: batches_pb2.ListFilesRequest,
                        context: grpc.aio.ServicerContext) -> batches_pb2.ListFilesResponse:
        view = viewer(caller(), request.on_behalf_of)
        pairs, _ = await self.session.get_prefix(self.session.keys.files())
        files = [f for f in (batches_pb2.File.FromString(v) for _, v in pairs)
                 if (view is None or f.tenant == view) and (not request.purpose or f.purpose == request.purpose)]
        files.sort(key=lambda f: (f.created_ms, f.id))
        return batches_pb2.ListFilesResponse(files=files)

    async def DownloadFile(self, request: batches_pb2.FileRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[batches_pb2.FileChunk]:
        record = await self._get(request.id, request.on_behalf_of)
        chunks = self.blobs.read(record.sha256)
        first = True
        while (data := await asyncio.to_thread(next, chunks, None)) is not None:
            for at in range(0, len(data), CHUNK):
                yield batches_pb2.FileChunk(data=data[at:at + CHUNK], total_bytes=record.bytes if first else 0,
                                            purpose=record.purpose if first else "",
                                            filename=record.filename if first else "")
                first = False
        if first:  # an empty file: one chunk with its header
            yield batches_pb2.FileChunk(total_bytes=0, purpose=record.purpose, filename=record.filename)

    async def DeleteFile(self, request: batches_pb2.FileRequest,
                         context: grpc.aio.ServicerContext) -> batches_pb2.File:
        record = await self._get(request.id, request.on_behalf_of)
        pairs, _ = await self.session.get_prefix(self.session.keys.batches())
        for _, raw in pairs:
            batch = batches_pb2.Batch.FromString(raw)
            if batch.input_file_id == record.id and batch.status not in TERMINAL:
                raise FailedPrecondition(f"file {record.id} is the input of batch {batch.id}, which is not "
                                         "finished; cancel it first", field="file_id")
        await self.session.client.delete(self.session.keys.file(record.id))
        if not await self._still_used(record.sha256):
            await asyncio.to_thread(self.blobs.delete, record.sha256)
        self.events.publish("file", "deleted", record.id, f"file {record.id} deleted", tenant=record.tenant)
        return record

    async def _still_used(self, sha: str) -> bool:
        """Whether another file, a model version or a job still needs the blob."""
        return bool(await self.store.artifact_user(sha))
