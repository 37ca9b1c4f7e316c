"""Tokenizing at the front door: the core of the router's Tokenizer service and of the HTTP
API's POST /tokenize and /detokenize, which take and give vLLM's shapes.

A model's tokenizer lives with its replicas (their engine loaded it), so each call goes to
a ready replica of the model, admitted and chosen as a Generate is: the caller's key must
be allowed the model (`Gate.admit`: another tenant's model is NOT_FOUND as if it did not
exist, a model outside the key's list PERMISSION_DENIED, and the call counts against the
tenant's request limits), an adapter's name means the deployment that serves it, and
`ReplicaPool.pick` picks the replica (starting a deployment scaled to zero, keeping to the
canary split). A worker that fails the call (UNAVAILABLE) is avoided and another replica
asked, at most MAX_ATTEMPTS in all.

The body functions are pure, like `openai_api`'s: field tables that the validator and the
OpenAPI description share, and every refusal an InvalidArgument naming the field.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from maas.mesh import tracing
from maas.mesh.clients import REPLICA_HEADER, dial
from maas.mesh.errors import InvalidArgument, NotFound, from_rpc_error
from maas.mesh.logs import new_request_id, request_id_var
from maas.services.router import openai_api
from maas.services.router.forward import MAX_ATTEMPTS, Forwarder
from maas.services.router.openai_api import Field
from maas.services.router.tenants import Caller, Gate, Ticket
from maas.v1 import mesh_pb2, tokenize_pb2, tokenize_pb2_grpc

MAX_TOKEN_ID = 2**32 - 1

_MODEL = Field(("string",), "Deployment whose tokenizer to use: `name` (or `name@version`, or the name of an "
                            "adapter a deployment serves).", required=True)

TOKENIZE_FIELDS: dict[str, Field] = {
    "model": _MODEL,
    "prompt": Field(("string",), "The text to tokenize; or give `messages`."),
    "messages": Field(("array",), "A chat instead of `prompt`, rendered with the model's chat template as a chat "
                                  "completion's is (the messages of /v1/chat/completions)."),
    "add_generation_prompt": Field(("boolean",), "With `messages`: end with the assistant's turn to speak, as a chat "
                                                 "completion does. Default true."),
    "tools": Field(("array",), "With `messages`: functions offered to the model (as for /v1/chat/completions), "
                               "written into the chat as a chat completion with these tools writes them."),
    "add_special_tokens": Field(("boolean",), "Add the tokenizer's special tokens (such as BOS), as the engine does "
                                              "to every prompt it serves. Default true."),
    "return_token_strs": Field(("boolean",), "Also return each token as the tokenizer spells it (`token_strs`)."),
}

CHAT_ONLY = ("add_generation_prompt", "tools")

DETOKENIZE_FIELDS: dict[str, Field] = {
    "model": _MODEL,
    "tokens": Field(("array",), "Token ids of the model's vocabulary.", required=True),
}


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return str(value)
    return {str: "a string", float: "a number", list: "an array", dict: "an object"}.get(type(value), "null")


def tokenize_request(body: object, ignored: list[str] | None = None) -> tokenize_pb2.TokenizeRequest:
    """POST /tokenize's body as a TokenizeRequest: a prompt or a chat, not both."""
    b = openai_api.checked(body, TOKENIZE_FIELDS, ignored)
    if not b["model"]:
        raise InvalidArgument("model must not be empty", field="model")
    request = tokenize_pb2.TokenizeRequest(model=b["model"], return_token_strs=b.get("return_token_strs", False))
    if "add_special_tokens" in b:
        request.add_special_tokens = b["add_special_tokens"]
    if "messages" in b:
        if "prompt" in b:
            raise InvalidArgument("give either prompt or messages, not both", field="messages")
        # read as a chat completion reads its chat, so that it renders the same
        chat, _ = openai_api.chat_request({"model": b["model"], "messages": b["messages"], "tools": b.get("tools")})
        request.messages.extend(chat.messages)
        request.tools.extend(chat.tools)
        if "add_generation_prompt" in b:
            request.add_generation_prompt = b["add_generation_prompt"]
        return request
    if "prompt" not in b:
        raise InvalidArgument("prompt is required (or messages, a chat)", field="prompt")
    if not b["prompt"]:
        raise InvalidArgument("prompt must not be empty", field="prompt")
    for name in CHAT_ONLY:  # a chat's options, meaningless for a prompt: as unknown fields
        if name in b:
            if ignored is None:
                raise InvalidArgument(f"{name} applies to messages, not to a prompt", field=name)
            ignored.append(name)
    request.prompt = b["prompt"]
    return request


def detokenize_request(body: object, ignored: list[str] | None = None) -> tokenize_pb2.DetokenizeRequest:
    """POST /detokenize's body as a DetokenizeRequest. Ids are checked against the model's
    vocabulary by the worker that holds its tokenizer."""
    b = openai_api.checked(body, DETOKENIZE_FIELDS, ignored)
    if not b["model"]:
        raise InvalidArgument("model must not be empty", field="model")
    tokens = b["tokens"]
    for i, token in enumerate(tokens):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= MAX_TOKEN_ID:
            raise InvalidArgument(f"tokens[{i}] must be a token id (an integer from 0 to {MAX_TOKEN_ID}), "
                                  f"got {_kind(token)}", field="tokens")
    return tokenize_pb2.DetokenizeRequest(model=b["model"], tokens=tokens)


def tokenize_reply(reply: tokenize_pb2.TokenizeResponse, with_strs: bool) -> dict[str, Any]:
    """vLLM's TokenizeResponse: `token_strs` is null unless asked for."""
    return {"count": len(reply.tokens), "max_model_len": reply.max_model_len, "tokens": list(reply.tokens),
            "token_strs": list(reply.token_strs) if with_strs else None}


def detokenize_reply(reply: tokenize_pb2.DetokenizeResponse) -> dict[str, Any]:
    return {"prompt": reply.prompt}


Request = TypeVar("Request", tokenize_pb2.TokenizeRequest, tokenize_pb2.DetokenizeRequest)
Response = TypeVar("Response", tokenize_pb2.TokenizeResponse, tokenize_pb2.DetokenizeResponse)


class Tokenization:
    """Tokenize and Detokenize on a ready replica of the model, for the Tokenizer servicer and
    the HTTP API. Keeps a channel per worker endpoint it called; `close` closes them."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self._stubs: dict[str, tokenize_pb2_grpc.TokenizerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    async def close(self) -> None:
        channels, self._channels = self._channels, []
        self._stubs.clear()
        for channel in channels:
            await channel.close()

    async def tokenize(self, request: tokenize_pb2.TokenizeRequest, timeout: float | None,
                       who: Caller) -> tokenize_pb2.TokenizeResponse:
        return await self._call(request, timeout, who, lambda stub: stub.Tokenize)

    async def detokenize(self, request: tokenize_pb2.DetokenizeRequest, timeout: float | None,
                         who: Caller) -> tokenize_pb2.DetokenizeResponse:
        return await self._call(request, timeout, who, lambda stub: stub.Detokenize)

    async def _call(self, request: Request, timeout: float | None, who: Caller,
                    method: Callable[[tokenize_pb2_grpc.TokenizerStub], Callable[..., Awaitable[Response]]]
                    ) -> Response:
        asked = request.model
        if not asked:
            raise InvalidArgument("model must not be empty", field="model")
        gate, pool = self.forwarder.gate, self.forwarder.pool
        ticket = gate.admit(who, asked) if gate is not None else Ticket(None)  # the key's access, as Generate's
        try:
            if self._is_pipeline(asked):
                raise InvalidArgument(f"{asked!r} is a pipeline, which has no tokenizer of its own: tokenize with "
                                      "a model its steps call", field="model")
            if asked not in pool.deployments.items:  # a fine-tuned adapter's name: the deployment serving it
                request.model = pool.serving_adapter(asked) or asked
            rid = request.request_id or request_id_var.get()
            request.request_id = rid = new_request_id() if rid in ("", "-") else rid
            metadata: tuple[tuple[str, str], ...] = (("x-request-id", rid), *tracing.headers(),
                                                     *self.forwarder.credential)
            deadline = None if timeout is None else time.monotonic() + timeout
            tried: set[str] = set()
            while True:
                try:
                    replica = await pool.pick(request.model, tried, _remaining(deadline))
                except NotFound as e:  # as another tenant's model is refused (`Gate.admit`): naming the field
                    e.field = e.field or "model"
                    raise
                tried.add(replica.replica_id)
                try:
                    with pool.track(replica):
                        return await method(self._stub(replica))(
                            request, timeout=_remaining(deadline),
                            metadata=(*metadata, (REPLICA_HEADER, replica.replica_id)))
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or len(tried) >= MAX_ATTEMPTS:
                        raise from_rpc_error(e) from None
                    pool.mark_failed(replica)  # its worker failed: try another replica
        finally:
            if ticket.state is not None:
                Gate.release(ticket)

    def _is_pipeline(self, model: str) -> bool:
        name = model.partition("@")[0]
        pool = self.forwarder.pool
        dep = pool.deployments.items.get(name)
        if dep is not None:
            return dep.format == "pipeline"
        registered = pool.models.items.get(name)
        return registered is not None and registered.latest_format == "pipeline"

    def _stub(self, replica: mesh_pb2.ReplicaInfo) -> tokenize_pb2_grpc.TokenizerStub:
        stub = self._stubs.get(replica.endpoint)
        if stub is None:
            channel = dial(replica.endpoint, tls=self.forwarder.pool.session.config.tls)
            self._channels.append(channel)
            stub = self._stubs[replica.endpoint] = tokenize_pb2_grpc.TokenizerStub(channel)
        return stub


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())

