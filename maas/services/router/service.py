"""Router Inference servicer: the gRPC face of the forwarder (forward.py). Deadlines
propagate (each call gets the caller's remaining time) and a cancelled client call
cancels the downstream call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from maas.mesh.auth import key_from_metadata
from maas.services.router.forward import SESSION_HEADER, Forwarder
from maas.v1 import inference_pb2, inference_pb2_grpc


def _key(context: grpc.aio.ServicerContext) -> str:
    return key_from_metadata(context.invocation_metadata())


def _session(context: grpc.aio.ServicerContext) -> str:
    """Session affinity: requests with the same `x-session-id` go to the same replica."""
    for name, value in context.invocation_metadata() or ():
        if name == SESSION_HEADER:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return ""


class RouterInferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateChunk]:
        async for chunk in self.forwarder.stream(request, context.time_remaining(), _key(context),
                                                     _session(context)):
            yield chunk

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        return await self.forwarder.generate(request, context.time_remaining(), _key(context),
                                                 _session(context))

    async def Embed(self, request: inference_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> inference_pb2.EmbedResponse:
        return await self.forwarder.embed(request, context.time_remaining(), _key(context))

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        return self.forwarder.models(_key(context))
