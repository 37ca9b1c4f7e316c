"""Router Inference servicer: the gRPC face of the forwarder (forward.py); and the Tokenizer
servicer, the gRPC face of `tokenize.Tokenization`. Deadlines
propagate (each call gets the caller's remaining time) and a cancelled client call
cancels the downstream call.

Generate and GenerateStream relay bytes: the request is parsed to read what routing needs
but sent on as it came (see `Forwarder`), and the worker's replies go back to the client as
the worker serialized them (`add_to_server` registers serializers that pick those bytes),
so the router never serializes a message it only passes through."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from operator import itemgetter

import grpc

from maas.mesh.authz import Principal, caller
from maas.mesh.logs import new_request_id
from maas.services.router import pipelines
from maas.services.router.forward import SESSION_HEADER, Chunk, Forwarder, Reply
from maas.services.router.tokenize import Tokenization
from maas.v1 import inference_pb2, tokenize_pb2, tokenize_pb2_grpc

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
TOKENIZER_SERVICE = tokenize_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name

Request = tuple[inference_pb2.GenerateRequest, bytes]


def _request(raw: bytes) -> Request:
    return inference_pb2.GenerateRequest.FromString(raw), raw


_as_received = itemgetter(1)  # a relayed reply's bytes


def _caller(context: grpc.aio.ServicerContext) -> tuple[Principal, str]:
    """(who calls, as the runtime's interceptor authenticated them; session) of a call:
    requests with the same `x-session-id` go to the same replica."""
    metadata = context.invocation_metadata() or ()
    session = ""
    for name, value in metadata:
        if name == SESSION_HEADER:
            session = value.decode(errors="replace") if isinstance(value, bytes) else value
            break
    return caller(), session


class RouterInferenceServicer:
    """`default_timeout` bounds a call that came without a deadline (seconds; None: unbounded),
    as the HTTP API's default does, so no request holds a replica forever."""

    def __init__(self, forwarder: Forwarder, default_timeout: float | None = None,
                 catalog: pipelines.PipelineCatalog | None = None) -> None:
        self.forwarder = forwarder
        self.default_timeout = default_timeout
        self.pipelines = catalog or pipelines.PipelineCatalog(forwarder)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return self.default_timeout if remaining is None else remaining

    def GenerateStream(self, request: Request, context: grpc.aio.ServicerContext) -> AsyncIterator[Chunk]:
        who, session = _caller(context)  # read now: the authenticated caller of this call
        if self.pipelines.maybe(request[0].model):  # (a model's own stream is relayed with no extra layer)
            return self._maybe_pipeline_stream(request, context, who, session)
        return self.forwarder.stream(request[0], self._timeout(context), who, session, payload=request[1])

    async def _maybe_pipeline_stream(self, request: Request, context: grpc.aio.ServicerContext, who: Principal,
                                     session: str) -> AsyncIterator[Chunk]:
        found = await self.pipelines.find(request[0].model)
        if found is None:
            async for chunk in self.forwarder.stream(request[0], self._timeout(context), who, session,
                                                     payload=request[1]):
                yield chunk
            return
        req = request[0]
        req.request_id = req.request_id or new_request_id()
        run, services = pipelines.start(self.forwarder, who, req, found, self._timeout(context), self.pipelines)
        async with contextlib.aclosing(run.answer()) as answer:
            async for text in answer:
                out = inference_pb2.GenerateChunk(request_id=req.request_id, model=req.model, text=text)
                yield out, out.SerializeToString()
        last = inference_pb2.GenerateChunk(request_id=req.request_id, model=req.model,
                                           finish_reason=pipelines.finish(run), usage=services.usage)
        yield last, last.SerializeToString()

    async def Generate(self, request: Request, context: grpc.aio.ServicerContext) -> Reply:
        if self.pipelines.maybe(request[0].model) and (found := await self.pipelines.find(request[0].model)):
            req = request[0]
            req.request_id = req.request_id or new_request_id()
            run, services = pipelines.start(self.forwarder, caller(), req, found, self._timeout(context),
                                            self.pipelines)
            async with contextlib.aclosing(run.answer()) as answer:
                text = "".join([chunk async for chunk in answer])
            reply = inference_pb2.GenerateResponse(request_id=req.request_id, model=req.model, text=text,
                                                   finish_reason=pipelines.finish(run), usage=services.usage)
            return reply, reply.SerializeToString()
        return await self.forwarder.generate(request[0], self._timeout(context), *_caller(context),
                                             payload=request[1])

    async def Embed(self, request: inference_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> inference_pb2.EmbedResponse:
        return await self.forwarder.embed(request, self._timeout(context), _caller(context)[0])

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        return self.forwarder.models(_caller(context)[0])


def add_to_server(servicer: RouterInferenceServicer, server: grpc.aio.Server) -> None:
    """Like the generated `add_InferenceServicer_to_server`, with the relaying (de)serializers."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=_request, response_serializer=_as_received),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=_request, response_serializer=_as_received),
        "Embed": grpc.unary_unary_rpc_method_handler(
            servicer.Embed, request_deserializer=inference_pb2.EmbedRequest.FromString,
            response_serializer=inference_pb2.EmbedResponse.SerializeToString),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=inference_pb2.ListModelsRequest.FromString,
            response_serializer=inference_pb2.ListModelsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class RouterTokenizerServicer(tokenize_pb2_grpc.TokenizerServicer):
    """The Tokenizer service: each call on a ready replica of its model (`tokenize.Tokenization`),
    within the caller's remaining time (`default_timeout` without a deadline)."""

    def __init__(self, tokenization: Tokenization, default_timeout: float | None = None) -> None:
        self.tokenization = tokenization
        self.default_timeout = default_timeout

    def _timeout(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return self.default_timeout if remaining is None else remaining

    async def Tokenize(self, request: tokenize_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> tokenize_pb2.TokenizeResponse:
        return await self.tokenization.tokenize(request, self._timeout(context), caller())

    async def Detokenize(self, request: tokenize_pb2.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> tokenize_pb2.DetokenizeResponse:
        return await self.tokenization.detokenize(request, self._timeout(context), caller())
