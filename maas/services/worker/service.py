"""Worker Inference servicer: a thin adapter from protobuf to the replica's engine.

A chat request (`messages` instead of `prompt`) is rendered here by the replica's engine,
which owns the tokenizer and so the model's chat template."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc

from maas.mesh.clients import REPLICA_HEADER
from maas.mesh.errors import InvalidArgument
from maas.mesh.logs import model_var, tenant_var
from maas.mesh.tools import chat_turns, openai_messages, openai_tools
from maas.services.worker.coalesce import batches
from maas.services.worker.convert import chunk_from_delta, request_from_proto
from maas.services.worker.engines.base import ChatMessage, Engine
from maas.services.worker.replicas import ReplicaManager
from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc, mesh_pb2


def _replica_hint(context: grpc.aio.ServicerContext) -> str:
    """The replica the router picked for this call, if it said."""
    for key, value in context.invocation_metadata() or ():
        if key == REPLICA_HEADER:
            return str(value)
    return ""


def _render_chat(request: inference_pb2.GenerateRequest, engine: Engine) -> inference_pb2.GenerateRequest:
    """The request with its chat rendered into `prompt` (unchanged if it has no messages);
    tools, calls and their results are written into the turns (`maas.mesh.tools`)."""
    if not request.messages:
        if request.tools:
            raise InvalidArgument("tools need a chat (messages), not a prompt", field="tools")
        return request
    if request.prompt:
        raise InvalidArgument("give either prompt or messages, not both", field="messages")
    rendered = inference_pb2.GenerateRequest()
    rendered.CopyFrom(request)
    del rendered.messages[:]
    rendered.prompt = render_messages(engine, request.messages, request.tools)
    return rendered


def render_messages(engine: Engine, messages: Sequence[inference_pb2.ChatMessage],
                    tools: Sequence[inference_pb2.Tool]) -> str:
    """A chat as its prompt, ending where the assistant's turn begins. With tools, calls or
    results in it: through the model's own template where that template renders tools in
    the format the router reads (Hermes, Qwen), else written into plain turns
    (`maas.mesh.tools.chat_turns`, docs/structured-outputs.md#tool-calling)."""
    if tools or any(m.tool_calls or m.role == "tool" for m in messages):
        own = getattr(engine, "render_tool_chat", None)
        if own is not None and (prompt := own(openai_messages(messages), openai_tools(tools))) is not None:
            return str(prompt)
    return engine.render_chat([ChatMessage(role, content) for role, content in chat_turns(messages, tools)])


def merge_chunks(chunks: list[inference_pb2.GenerateChunk]) -> inference_pb2.GenerateChunk:
    """Consecutive chunks of one stream as one: text and tokens in order, the end (finish
    reason and usage) from the last."""
    out = chunks[0]
    for chunk in chunks[1:]:
        out.text += chunk.text
        out.token_ids.extend(chunk.token_ids)
        out.logprobs.extend(chunk.logprobs)
        out.prompt_token_ids.extend(chunk.prompt_token_ids)  # (only a stream's first chunk has them)
        out.prompt_logprobs.extend(chunk.prompt_logprobs)
        if chunk.finish_reason:
            out.finish_reason = chunk.finish_reason
            out.usage.CopyFrom(chunk.usage)
    return out


class WorkerInferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, replicas: ReplicaManager) -> None:
        self.replicas = replicas

    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateChunk]:
        async for chunk in self._chunks(request, context, stream=True):
            yield chunk

    async def _chunks(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext, *,
                      stream: bool) -> AsyncIterator[inference_pb2.GenerateChunk]:
        tenant_var.set(request.tenant)  # on this request's log lines (the call's own context)
        model_var.set(request.model)
        async with self.replicas.serve(request.model, _replica_hint(context),
                                       online=request.service_class != "batch") as (replica, engine):
            req = request_from_proto(_render_chat(request, engine),
                                     await self.replicas.adapter(replica, request.adapter), stream=stream)
            # a reader that falls behind gets the tokens produced meanwhile in one message
            async with contextlib.aclosing(batches(engine.generate(req))) as deltas_of:
                async for deltas in deltas_of:
                    chunks = [chunk_from_delta(d, request_id=req.request_id, model=replica.ref,
                                               replica_id=replica.info.replica_id) for d in deltas]
                    yield merge_chunks(chunks)

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        """The whole answer at once: the engine need not send a message per step."""
        out = inference_pb2.GenerateResponse()
        async for chunk in self._chunks(request, context, stream=False):
            out.text += chunk.text
            out.token_ids.extend(chunk.token_ids)
            out.logprobs.extend(chunk.logprobs)
            out.prompt_token_ids.extend(chunk.prompt_token_ids)
            out.prompt_logprobs.extend(chunk.prompt_logprobs)
            out.request_id, out.model, out.replica_id = chunk.request_id, chunk.model, chunk.replica_id
            if chunk.finish_reason:
                out.finish_reason = chunk.finish_reason
                out.usage.CopyFrom(chunk.usage)
        return out

    async def Embed(self, request: inference_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> inference_pb2.EmbedResponse:
        async with self.replicas.serve(request.model, _replica_hint(context),
                                       online=request.service_class != "batch") as (replica, engine):
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
