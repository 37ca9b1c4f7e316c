"""Router Inference servicer: pick a replica, forward, retry on a dead worker before the
first token. Deadlines propagate (each call gets the caller's remaining time) and a
cancelled client call cancels the downstream call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from maas.mesh.clients import REPLICA_HEADER
from maas.mesh.errors import Unavailable, from_rpc_error
from maas.mesh.logs import new_request_id, request_id_var
from maas.services.router.pool import ReplicaPool
from maas.v1 import inference_pb2, inference_pb2_grpc, mesh_pb2

MAX_ATTEMPTS = 3
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class RouterInferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool

    @staticmethod
    def _prepare(request: inference_pb2.GenerateRequest) -> tuple[str, tuple[tuple[str, str], ...]]:
        rid = request.request_id or (request_id_var.get() if request_id_var.get() != "-" else new_request_id())
        request.request_id = rid
        return rid, (("x-request-id", rid),)

    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateChunk]:
        _, metadata = self._prepare(request)
        tried: set[str] = set()
        for attempt in range(MAX_ATTEMPTS):
            replica = await self.pool.pick(request.model, tried, context.time_remaining())
            tried.add(replica.replica_id)
            call = self.pool.stub(replica).GenerateStream(request, timeout=context.time_remaining(),
                                                          metadata=(*metadata, (REPLICA_HEADER, replica.replica_id)))
            produced = False
            try:
                with self.pool.track(replica):
                    async for chunk in call:
                        produced = True
                        yield chunk
                return
            except grpc.aio.AioRpcError as e:
                if e.code() in RETRYABLE and not produced and attempt + 1 < MAX_ATTEMPTS \
                        and len(self.pool.ready(request.model)) > len(tried):
                    self.pool.mark_failed(replica)
                    continue
                if e.code() in RETRYABLE:
                    self.pool.mark_failed(replica)
                    where = "mid-stream" if produced else "before the first token"
                    raise Unavailable(f"worker {replica.worker_id} failed {where}: {e.details()}") from None
                raise from_rpc_error(e) from None
            finally:
                call.cancel()

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        _, metadata = self._prepare(request)
        tried: set[str] = set()
        for attempt in range(MAX_ATTEMPTS):
            replica = await self.pool.pick(request.model, tried, context.time_remaining())
            tried.add(replica.replica_id)
            try:
                with self.pool.track(replica):
                    return await self.pool.stub(replica).Generate(
                        request, timeout=context.time_remaining(),
                        metadata=(*metadata, (REPLICA_HEADER, replica.replica_id)))
            except grpc.aio.AioRpcError as e:
                if e.code() in RETRYABLE and attempt + 1 < MAX_ATTEMPTS \
                        and len(self.pool.ready(request.model)) > len(tried):
                    self.pool.mark_failed(replica)
                    continue
                if e.code() in RETRYABLE:
                    self.pool.mark_failed(replica)
                    raise Unavailable(f"worker {replica.worker_id} failed: {e.details()}") from None
                raise from_rpc_error(e) from None
        raise Unavailable(f"model {request.model!r}: no replica could serve the request")

    async def Embed(self, request: inference_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> inference_pb2.EmbedResponse:
        replica = await self.pool.pick(request.model, deadline=context.time_remaining())
        try:
            with self.pool.track(replica):
                return await self.pool.stub(replica).Embed(
                    request, timeout=context.time_remaining(), metadata=((REPLICA_HEADER, replica.replica_id),))
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        by_name: dict[str, inference_pb2.ServedModel] = {}
        for r in self.pool.replicas.items.values():
            if r.state != mesh_pb2.REPLICA_STATE_READY:
                continue
            if r.deployment not in by_name:
                by_name[r.deployment] = inference_pb2.ServedModel(
                    name=r.deployment, version=str(r.model_version), task=r.task or "generate",
                    context_length=r.context_length)
            by_name[r.deployment].ready_replicas += 1
        return inference_pb2.ListModelsResponse(models=[by_name[name] for name in sorted(by_name)])
