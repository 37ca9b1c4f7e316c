"""Worker Inference servicer: a thin adapter from protobuf to the replica's engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from maas.mesh.clients import REPLICA_HEADER
from maas.mesh.errors import InvalidArgument
from maas.services.worker.convert import chunk_from_delta, request_from_proto
from maas.services.worker.replicas import ReplicaManager
from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc, mesh_pb2


def _replica_hint(context: grpc.aio.ServicerContext) -> str:
    """The replica the router picked for this call, if it said."""
    for key, value in context.invocation_metadata() or ():
        if key == REPLICA_HEADER:
            return str(value)
    return ""


class WorkerInferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, replicas: ReplicaManager) -> None:
        self.replicas = replicas

    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateChunk]:
        async with self.replicas.serve(request.model, _replica_hint(context)) as (replica, engine):
            req = request_from_proto(request, await self.replicas.adapter(replica, request.adapter))
            stream = engine.generate(req)
            try:
                async for delta in stream:
                    yield chunk_from_delta(delta, request_id=req.request_id, model=replica.ref,
                                           replica_id=replica.info.replica_id)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        out = inference_pb2.GenerateResponse()
        async for chunk in self.GenerateStream(request, context):
            out.text += chunk.text
            out.token_ids.extend(chunk.token_ids)
            out.logprobs.extend(chunk.logprobs)
            out.request_id, out.model, out.replica_id = chunk.request_id, chunk.model, chunk.replica_id
            if chunk.finish_reason:
                out.finish_reason = chunk.finish_reason
                out.usage.CopyFrom(chunk.usage)
        return out

    async def Embed(self, request: inference_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> inference_pb2.EmbedResponse:
        async with self.replicas.serve(request.model, _replica_hint(context)) as (replica, engine):
            embed = getattr(engine, "embed", None)
            if embed is None:
                raise InvalidArgument(f"model {request.model!r} is a generative model: use Generate, not Embed",
                                      field="model")
            vectors, tokens = await embed(list(request.inputs),
                                          normalize=request.normalize if request.HasField("normalize") else True)
        return inference_pb2.EmbedResponse(
            request_id=request.request_id, model=replica.ref, usage=common_pb2.Usage(prompt_tokens=tokens),
            data=[inference_pb2.Embedding(values=v) for v in vectors])

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        models = [inference_pb2.ServedModel(name=r.assignment.model_name, version=str(r.assignment.model_version),
                                            ready_replicas=1, task=r.info.task or "generate",
                                            context_length=r.info.context_length)
                  for r in self.replicas.replicas.values() if r.info.state == mesh_pb2.REPLICA_STATE_READY]
        return inference_pb2.ListModelsResponse(models=models)
