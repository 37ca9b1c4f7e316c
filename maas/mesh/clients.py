"""Finding and dialling other services through etcd (never from a list of addresses)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aetcd
import aetcd.exceptions
import grpc

from maas.mesh import tracing
from maas.mesh.artifacts import ARTIFACT, CHUNK, file_digest, pack_directory
from maas.mesh.config import parse_host_port, redact, url_credentials
from maas.mesh.errors import InvalidArgument, MaasError, NotFound, StartupError, Unavailable, from_rpc_error
from maas.mesh.etcd import EtcdSession
from maas.mesh.keys import Keys
from maas.mesh.server import GRPC_OPTIONS
from maas.mesh.tls import TlsFiles
from maas.v1 import batches_pb2_grpc, mesh_pb2, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

# gRPC metadata a router sets on calls to a worker: the replica it picked for the request.
REPLICA_HEADER = "x-maas-replica"


async def live_services(client: aetcd.Client, keys: Keys, kind: str) -> list[mesh_pb2.ServiceInfo]:
    found = []
    for kv in await client.get_prefix(keys.services(kind)):
        info = mesh_pb2.ServiceInfo()
        info.ParseFromString(kv.value)
        found.append(info)
    return found


async def pick_endpoint(client: aetcd.Client, keys: Keys, kind: str) -> str:
    services = await live_services(client, keys, kind)
    if not services:
        raise Unavailable(f"no {kind} is running (none registered in etcd under {keys.services(kind).decode()})")
    return random.choice(services).endpoint


def credential_metadata(credential: str) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata that presents a key (empty without one)."""
    return (("authorization", f"Bearer {credential}"),) if credential else ()


class _Credential:
    """Sends one key with every call on a channel, unless the call brings its own, and the
    caller's trace context. gRPC takes one interceptor per call type (a class that is
    several is registered as the first only), hence the four below."""

    def __init__(self, credential: str) -> None:
        self.metadata = credential_metadata(credential)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if "authorization" not in metadata and "x-api-key" not in metadata:
            for key, value in self.metadata:
                metadata.add(key, value)
        if "traceparent" not in metadata:
            for key, value in tracing.headers():
                metadata.add(key, value)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


class _UnaryUnary(_Credential, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_Credential, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_Credential, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_Credential, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def dial(endpoint: str, credential: str = "", tls: TlsFiles | None = None) -> grpc.aio.Channel:
    """A channel to `endpoint` whose calls present `credential` (a key) and the caller's trace
    context, if given a credential, over TLS verified against `tls.ca` when there is one.
    The router's calls to workers pass both per call instead (no interceptor on its hot
    path: it dials workers without a credential)."""
    interceptors = ([kind(credential) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
                    if credential else None)
    if tls is not None and tls.dials:
        return grpc.aio.secure_channel(endpoint, tls.channel_credentials(), options=GRPC_OPTIONS,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(endpoint, options=GRPC_OPTIONS, interceptors=interceptors)


async def upload_file(stub: registry_pb2_grpc.RegistryStub, path: Path, *, timeout: float = 3600.0,
                      metadata: tuple[tuple[str, str], ...] = (),
                      progress: Callable[[int], object] | None = None,
                      digest: tuple[str, int] | None = None) -> registry_pb2.Artifact:
    """Stream a file to the registry's artifact store in CHUNK pieces. The registry checks
    the digest sent with the first chunk and keeps nothing if the bytes differ.
    `progress` is called with each chunk's size (for a progress bar); `digest` is the
    file's (sha256, size) when the caller has it already."""
    sha, size = digest if digest is not None else await asyncio.to_thread(file_digest, path)

    async def chunks() -> AsyncIterator[registry_pb2.ArtifactChunk]:
        with open(path, "rb") as f:  # noqa: ASYNC230 - reads go through to_thread below
            first = True
            while data := await asyncio.to_thread(f.read, CHUNK):
                if progress is not None:
                    progress(len(data))
                yield registry_pb2.ArtifactChunk(data=data, sha256=sha if first else "",
                                                 total_bytes=size if first else 0)
                first = False

    try:
        return await stub.UploadArtifact(chunks(), timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e, f"uploading {path.name}: ") from None


async def upload_directory(stub: registry_pb2_grpc.RegistryStub, directory: Path, *,
                           progress: Callable[[int], object] | None = None,
                           on_size: Callable[[int], object] | None = None) -> str:
    """Pack a model, adapter or checkpoint directory as an artifact and upload it; returns
    its source ("artifact:<sha256>")."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "artifact.tar"
        digest = await asyncio.to_thread(pack_directory, directory, archive)
        if on_size is not None:
            on_size(digest[1])
        artifact = await upload_file(stub, archive, progress=progress, digest=digest)
    return f"{ARTIFACT}{artifact.sha256}"


class MeshClient:
    """A read-only view of a mesh for the CLI and tests: etcd lookups plus channels by kind."""

    def __init__(self, etcd_url: str, prefix: str = "/maas/", timeout: float = 5.0, credential: str = "",
                 tls: TlsFiles | None = None) -> None:
        host, port = parse_host_port(etcd_url, 2379)
        self.etcd_url = etcd_url
        self.credential = credential  # the key every call on its channels presents
        self.tls = tls  # the CA its channels verify services with (TLS), if any
        self.keys = Keys(prefix)
        user, password = url_credentials(etcd_url)
        self.etcd = aetcd.Client(host=host, port=port, username=user, password=password, timeout=timeout)
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def channel(self, kind: str, *, patience: float = 6.0) -> grpc.aio.Channel:
        """A channel to a live instance of `kind`. A process killed a moment ago stays
        registered until its lease expires, so candidates are tried (connect within 2 s)
        and, while none connects, looked up again for up to `patience` seconds (a restart
        or a standby's registration). Past that, the call made on the channel says why."""
        if kind in self._channels:
            return self._channels[kind]
        deadline = time.monotonic() + patience
        while True:
            try:
                services = await live_services(self.etcd, self.keys, kind)
            except (TimeoutError, aetcd.exceptions.ClientError):
                raise StartupError(f"cannot reach etcd at {redact(self.etcd_url)}; is the stack running "
                                   "(`maas up`), or pass --etcd / MAAS_ETCD") from None
            if not services:
                raise Unavailable(f"no {kind} is running (none registered in etcd under "
                                  f"{self.keys.services(kind).decode()})")
            random.shuffle(services)
            for info in services:
                channel = dial(info.endpoint, self.credential, self.tls)
                try:
                    async with asyncio.timeout(2.0):
                        await channel.channel_ready()
                except TimeoutError:
                    if time.monotonic() < deadline or info is not services[-1]:
                        await channel.close()
                        continue
                self._channels[kind] = channel
                return channel
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        await self.etcd.close()


CLOSE_LATER_SECONDS = 60.0  # a forgotten channel's calls in flight get this long to finish


class RegistryClient:
    """Resolves model references through the registry (found in etcd). Versions are
    immutable, so a resolved "name@N" is cached for good; "name" or an alias always asks."""

    def __init__(self, session: EtcdSession) -> None:
        self.session = session
        self._cache: dict[str, registry_pb2.ModelVersion] = {}
        self._channel: grpc.aio.Channel | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def resolve(self, ref: str, *, timeout: float = 5.0) -> registry_pb2.ModelVersion:
        """The version `ref` names. NotFound / InvalidArgument as the registry says;
        Unavailable when no registry answers (after one retry on a fresh lookup)."""
        if ref in self._cache:
            return self._cache[ref]
        for attempt in range(2):
            try:
                version = await (await self.stub()).GetVersion(registry_pb2.GetVersionRequest(ref=ref), timeout=timeout)
                break
            except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
                code = e.code() if isinstance(e, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
                if code == grpc.StatusCode.NOT_FOUND:
                    raise NotFound(e.details() or f"model {ref!r} not found") from None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(e.details() or "invalid model reference",
                                          field="model") from None
                self._forget_channel()  # the registry may have moved: look it up again
                if attempt:
                    raise Unavailable(f"the registry is unreachable ({code.name})") from None
        resolved = f"{version.name}@{version.version}"
        self._cache[resolved] = version
        return version

    async def download(self, sha: str, *, timeout: float = 3600.0) -> AsyncIterator[registry_pb2.ArtifactChunk]:
        """Stream an artifact's chunks from the registry."""
        call = (await self.stub()).DownloadArtifact(
            registry_pb2.DownloadArtifactRequest(sha256=sha), timeout=timeout)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"downloading artifact {sha[:12]}: ") from None

    async def stub(self) -> registry_pb2_grpc.RegistryStub:
        if self._channel is None:
            config = self.session.config
            endpoint = await pick_endpoint(self.session.client, self.session.keys, "registry")
            # another coroutine may have dialled while this one looked the endpoint up: one
            # channel only (a replaced one would be collected, and closed, under its calls)
            if self._channel is None:
                self._channel = dial(endpoint, config.credential, config.tls)
        return registry_pb2_grpc.RegistryStub(self._channel)

    async def files(self) -> batches_pb2_grpc.FilesStub:
        """The registry's Files service (docs/batches.md), on the same channel."""
        await self.stub()
        return batches_pb2_grpc.FilesStub(self._channel)

    async def delete_artifact(self, sha: str) -> bool:
        """Best effort: remove an artifact nothing needs any more (a superseded checkpoint).
        The registry keeps it if something still uses it; False then, or if it is away."""
        try:
            await (await self.stub()).DeleteArtifact(registry_pb2.DeleteArtifactRequest(sha256=sha), timeout=10)
            return True
        except grpc.aio.AioRpcError as e:
            log.info("artifact %s kept: %s", sha[:12], e.details())
        except MaasError as e:
            log.info("artifact %s kept: %s", sha[:12], e.message)
        return False

    async def exists(self, ref: str) -> bool:
        try:
            await self.resolve(ref, timeout=2.0)
            return True
        except NotFound:
            return False

    def _forget_channel(self) -> None:
        """Dial afresh on the next call. The old channel is closed a while later, not now:
        other coroutines may have calls in flight on it (closing it would fail them with
        "Channel is closed")."""
        old, self._channel = self._channel, None
        if old is not None:
            async def close_later() -> None:
                await asyncio.sleep(CLOSE_LATER_SECONDS)
                with contextlib.suppress(Exception):
                    await old.close()

            task = asyncio.ensure_future(close_later())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
            self._channel = None
