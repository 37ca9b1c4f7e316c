"""A model's tokenizer at work for the worker's Tokenizer service (POST /tokenize and
/detokenize at the router): the tokenizer its replica's engine loaded, so a prompt's ids
are the ids a Generate of that prompt feeds the model, and a chat is rendered as a
Generate's messages are (tools, calls and results written into its turns by
`maas.mesh.tools`, then `Engine.render_chat`).

Generative transformers engines (`HFEngine`, `ProcessEngine`) offer their tokenizer as
`engine.tokenizer`; the others have none to offer (the sim engine's "tokens" are words; the
embedding engine's tokenizer is busy in its batches' thread), which is FAILED_PRECONDITION.

`WorkerTokenizerServicer` is the service's thin gRPC adapter; the functions above it do the work.
`WorkerTokenizerFilesServicer` hands a router the tokenizer itself (its files, as the engine's
tokenizer saves them), for routers that tokenize prompts to route by cached prefix.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from maas.mesh.clients import REPLICA_HEADER
from maas.mesh.errors import FailedPrecondition, InvalidArgument
from maas.mesh.tools import chat_turns
from maas.services.worker.engines.base import ChatMessage, Engine, plain_chat
from maas.services.worker.replicas import ReplicaManager
from maas.services.worker.service import render_messages
from maas.v1 import tokenize_pb2, tokenize_pb2_grpc

INLINE_CHARS = 8192   # longer texts are tokenized off the event loop (as the engine does)
INLINE_TOKENS = 4096  # longer id lists are decoded off the event loop
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024  # a tokenizer's files, all together (large vocabularies are ~20 MB)


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    strs: list[str]  # empty unless asked for


def tokenizer_of(engine: Engine, model: str) -> Any:
    """The engine's transformers tokenizer, or FAILED_PRECONDITION naming the model."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise FailedPrecondition(f"model {model} offers no tokenizer: tokenizing needs a generative transformers "
                                 "model (format hf; a sim model's tokens are its words)", field="model")
    return tokenizer


def render(engine: Engine, tokenizer: Any, chat: Sequence[ChatMessage], model: str, *,
           add_generation_prompt: bool = True) -> str:
    """A chat as its prompt: with the generation prompt exactly as a Generate renders it;
    without, the same template (or `plain_chat`) stopping after the last message."""
    if add_generation_prompt:
        return engine.render_chat(chat)
    if not getattr(tokenizer, "chat_template", None):
        return plain_chat(chat).removesuffix("\n\nAssistant:")
    try:
        return str(tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in chat],
                                                 tokenize=False, add_generation_prompt=False))
    except Exception as exc:  # templates reject chats with raise_exception (e.g. roles out of order)
        raise InvalidArgument(f"the chat template of {model} rejected the messages: {exc}",
                              field="messages") from None


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, with_strs: bool) -> Tokens:
    ids = [int(i) for i in tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]
    return Tokens(ids, [str(s) for s in tokenizer.convert_ids_to_tokens(ids)] if with_strs else [])


async def tokenize(tokenizer: Any, text: str, *, add_special_tokens: bool = True, with_strs: bool = False) -> Tokens:
    """`text`'s token ids as the engine tokenizes a prompt (special tokens such as BOS
    included unless `add_special_tokens` is false), and each token's string if asked."""
    if not text:
        raise InvalidArgument("prompt must not be empty", field="prompt")
    if len(text) > INLINE_CHARS:
        return await asyncio.to_thread(_encode, tokenizer, text, add_special_tokens, with_strs)
    return _encode(tokenizer, text, add_special_tokens, with_strs)


async def detokenize(tokenizer: Any, ids: Sequence[int], model: str) -> str:
    """The text of `ids`, special tokens included; INVALID_ARGUMENT naming the first id
    outside the vocabulary."""
    vocab = len(tokenizer)
    for i, token in enumerate(ids):
        if token >= vocab:
            raise InvalidArgument(f"tokens[{i}] is {token}, outside the vocabulary of {model} (ids 0 to {vocab - 1})",
                                  field="tokens")
    if len(ids) > INLINE_TOKENS:
        return str(await asyncio.to_thread(tokenizer.decode, list(ids)))
    return str(tokenizer.decode(list(ids)))


def _replica_hint(context: grpc.aio.ServicerContext) -> str:
    """The replica the router picked for this call, if it said."""
    for key, value in context.invocation_metadata() or ():
        if key == REPLICA_HEADER:
            return str(value)
    return ""


class WorkerTokenizerServicer(tokenize_pb2_grpc.TokenizerServicer):
    """A model's tokenizer, on the replica the router picked (as for Inference)."""

    def __init__(self, replicas: ReplicaManager) -> None:
        self.replicas = replicas

    async def Tokenize(self, request: tokenize_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> tokenize_pb2.TokenizeResponse:
        if not request.model:
            raise InvalidArgument("model must not be empty", field="model")
        if request.prompt and request.messages:
            raise InvalidArgument("give either prompt or messages, not both", field="messages")
        if not request.prompt and not request.messages:
            raise InvalidArgument("prompt must not be empty (or give messages)", field="prompt")
        if request.tools and not request.messages:
            raise InvalidArgument("tools need a chat (messages), not a prompt", field="tools")
        async with self.replicas.serve(request.model, _replica_hint(context)) as (replica, engine):
            tokenizer = tokenizer_of(engine, replica.ref)
            text = request.prompt
            if request.messages:
                generation = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
                if generation:  # exactly as a Generate renders it
                    text = render_messages(engine, request.messages, request.tools)
                else:
                    chat = [ChatMessage(role, content) for role, content in chat_turns(request.messages, request.tools)]
                    text = render(engine, tokenizer, chat, replica.ref, add_generation_prompt=False)
            tokens = await tokenize(tokenizer, text, with_strs=request.return_token_strs,
                                    add_special_tokens=(request.add_special_tokens
                                                        if request.HasField("add_special_tokens") else True))
            return tokenize_pb2.TokenizeResponse(tokens=tokens.ids, token_strs=tokens.strs, model=replica.ref,
                                                 max_model_len=engine.context_length)

    async def Detokenize(self, request: tokenize_pb2.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> tokenize_pb2.DetokenizeResponse:
        if not request.model:
            raise InvalidArgument("model must not be empty", field="model")
        async with self.replicas.serve(request.model, _replica_hint(context)) as (replica, engine):
            text = await detokenize(tokenizer_of(engine, replica.ref), request.tokens, replica.ref)
            return tokenize_pb2.DetokenizeResponse(prompt=text, model=replica.ref)


def tokenizer_files(tokenizer: Any, model: str) -> list[tokenize_pb2.TokenizerFile]:
    """The files `tokenizer.save_pretrained` writes: what loads it again elsewhere, chat
    template included, whatever the model's source was (a directory, an artifact, a hub id)."""
    with tempfile.TemporaryDirectory(prefix="maas-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files)
        if size > MAX_TOKENIZER_BYTES:
            raise FailedPrecondition(f"the tokenizer of {model} is {size} bytes, more than the {MAX_TOKENIZER_BYTES} "
                                     "a router fetches", field="model")
        return [tokenize_pb2.TokenizerFile(name=p.name, data=p.read_bytes()) for p in files]


class WorkerTokenizerFilesServicer(tokenize_pb2_grpc.TokenizerFilesServicer):
    """A replica's tokenizer, as files, for a router (maas/services/router/kvroute.py)."""

    def __init__(self, replicas: ReplicaManager) -> None:
        self.replicas = replicas

    async def GetTokenizerFiles(self, request: tokenize_pb2.GetTokenizerFilesRequest,
                                context: grpc.aio.ServicerContext) -> tokenize_pb2.GetTokenizerFilesResponse:
        if not request.model:
            raise InvalidArgument("model must not be empty", field="model")
        replica = self.replicas.find(request.model, _replica_hint(context))
        if replica.engine is None:
            raise FailedPrecondition(f"{replica.ref} is not loaded on this worker", field="model")
        tokenizer = tokenizer_of(replica.engine, replica.ref)
        files = await asyncio.to_thread(tokenizer_files, tokenizer, replica.ref)
        return tokenize_pb2.GetTokenizerFilesResponse(model=replica.ref, files=files)
