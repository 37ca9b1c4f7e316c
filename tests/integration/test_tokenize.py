"""POST /tokenize and /detokenize (vLLM's shapes) and the Tokenizer gRPC service, end to end
on the forged demo model (hf engine, in its engine process): the ids are the ones a
completion feeds the model (its usage counts them), a chat is rendered as a chat completion
renders it, text round-trips, and the key's access to the model is the one Generate checks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from maas.mesh.clients import credential_metadata, dial
from maas.v1 import scheduler_pb2, tokenize_pb2, tokenize_pb2_grpc

from .conftest import MeshHarness

DEMO_CONTEXT = 1024  # the forged demo model's max_position_embeddings
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
TEXT = "def add(a, b):\n    return a + b  # héllo"
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Adds two numbers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
CALLED = [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1, \"b\": 2}"}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "3"}]


@dataclass
class Served:
    mesh: MeshHarness
    root: str      # http://host:port
    grpc: str      # the router's gRPC endpoint
    key: str       # an inference key of tenant acme, which owns the model "demo"

    async def post(self, path: str, body: object, key: str | None = None) -> tuple[int, Any, dict[str, str]]:
        key = self.key if key is None else key
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.root}{path}", json=body,
                                 headers={"Authorization": f"Bearer {key}"} if key else {}) as resp:
                return resp.status, await resp.json(), dict(resp.headers)

    async def ok(self, path: str, body: object) -> Any:
        status, reply, _ = await self.post(path, body)
        assert status == 200, reply
        return reply

    async def refused(self, path: str, body: object, status: int, param: str | None, says: str,
                      key: str | None = None) -> None:
        got, reply, _ = await self.post(path, body, key)
        assert got == status, (body, got, reply)
        assert reply["error"]["param"] == param and says in reply["error"]["message"], (body, reply)


@pytest.fixture
async def served(mesh: MeshHarness, demo_model_dir: Path) -> AsyncIterator[Served]:
    """The demo model registered and deployed for tenant acme (the admin names the owner), and
    the sim model "echo" in the platform's catalog."""
    await mesh.registry()
    await mesh.scheduler()
    router = await mesh.router(http_port=0)
    await mesh.worker()
    registry, scheduler = await mesh.stub("registry"), await mesh.stub("scheduler")
    from maas.v1 import registry_pb2

    await registry.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[attr-defined]
        name="demo", format="hf", source=str(demo_model_dir), owner="acme"), timeout=10)
    await scheduler.CreateDeployment(scheduler_pb2.CreateDeploymentRequest(  # type: ignore[attr-defined]
        deployment=scheduler_pb2.Deployment(name="demo", model="demo", replicas=1, owner="acme")), timeout=10)
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    await mesh.wait_ready("demo", timeout=60)
    key = await mesh.key("acme", "inference")
    yield Served(mesh, f"http://{router.info.http_endpoint}", router.endpoint, key)


async def test_tokens_are_the_ones_a_completion_counts_and_round_trip(served: Served) -> None:
    tokenized = await served.ok("/tokenize", {"model": "demo", "prompt": TEXT})
    assert set(tokenized) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tokenized["count"] == len(tokenized["tokens"]) > 5 and tokenized["token_strs"] is None
    assert tokenized["max_model_len"] == DEMO_CONTEXT
    completion = await served.ok("/v1/completions", {"model": "demo", "prompt": TEXT, "max_tokens": 1})
    assert completion["usage"]["prompt_tokens"] == tokenized["count"]

    # special tokens (the demo tokenizer's BOS) are added as the engine adds them, unless asked not to
    bare = await served.ok("/tokenize", {"model": "demo", "prompt": TEXT, "add_special_tokens": False,
                                         "return_token_strs": True})
    assert tokenized["tokens"] == [tokenized["tokens"][0], *bare["tokens"]]
    assert len(bare["token_strs"]) == bare["count"] and all(isinstance(s, str) for s in bare["token_strs"])
    assert (await served.ok("/detokenize", {"model": "demo", "tokens": bare["tokens"]}))["prompt"] == TEXT
    with_bos = (await served.ok("/detokenize", {"model": "demo", "tokens": tokenized["tokens"]}))["prompt"]
    assert with_bos.endswith(TEXT) and with_bos != TEXT  # the BOS is spelled out
    assert (await served.ok("/detokenize", {"model": "demo", "tokens": []}))["prompt"] == ""

    # a chat is rendered as a chat completion renders it
    chat = await served.ok("/tokenize", {"model": "demo", "messages": CHAT})
    answer = await served.ok("/v1/chat/completions", {"model": "demo", "messages": CHAT, "max_tokens": 1})
    assert chat["count"] == answer["usage"]["prompt_tokens"]
    unprompted = await served.ok("/tokenize", {"model": "demo", "messages": CHAT, "add_generation_prompt": False})
    assert chat["tokens"][:unprompted["count"]] == unprompted["tokens"] and unprompted["count"] < chat["count"]
    # tools, calls and their results are written into the chat as a chat completion writes them
    tooled = await served.ok("/tokenize", {"model": "demo", "messages": CALLED, "tools": TOOLS})
    answer = await served.ok("/v1/chat/completions", {"model": "demo", "messages": CALLED, "tools": TOOLS,
                                                      "max_tokens": 1})
    assert tooled["count"] == answer["usage"]["prompt_tokens"] > chat["count"] + 20

    # gRPC at the router: the same answers, with the version that gave them
    channel = dial(served.grpc)
    try:
        stub = tokenize_pb2_grpc.TokenizerStub(channel)
        md = credential_metadata(served.key)
        reply = await stub.Tokenize(tokenize_pb2.TokenizeRequest(model="demo", prompt=TEXT), metadata=md, timeout=10)
        assert list(reply.tokens) == tokenized["tokens"] and reply.model == "demo@1"
        assert reply.max_model_len == DEMO_CONTEXT and not reply.token_strs
        back = await stub.Detokenize(tokenize_pb2.DetokenizeRequest(model="demo", tokens=bare["tokens"]),
                                     metadata=md, timeout=10)
        assert back.prompt == TEXT
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Detokenize(tokenize_pb2.DetokenizeRequest(model="demo", tokens=[1, 4_000_000]), metadata=md,
                                  timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens[1]" in (bad.value.details() or "")
    finally:
        await channel.close()


async def test_access_is_the_models_and_bad_input_is_a_400_naming_the_field(served: Served) -> None:
    mesh = served.mesh
    rival = await mesh.key("rival", "inference")
    elsewhere = await mesh.key("acme", "inference", models=["echo"])
    for path, body in (("/tokenize", {"model": "demo", "prompt": "x"}),
                       ("/detokenize", {"model": "demo", "tokens": [1]})):
        # another tenant's model is exactly as missing as a model nobody registered
        missing = (await served.post(path, {**body, "model": "nope"}, rival))[1]["error"]
        assert missing["param"] == "model" and "not registered" in missing["message"], missing
        await served.refused(path, body, 404, "model", missing["message"].replace("nope", "demo"), key=rival)
        await served.refused(path, body, 403, "model", "may not use model 'demo'", key=elsewhere)
        await served.refused(path, body, 401, None, "API key is required", key="")
        await served.refused(path, {**body, "model": "nope"}, 404, "model", "not registered")

    for body, param, says in (
        ({"model": "demo"}, "prompt", "prompt is required (or messages"),
        ({"model": "demo", "prompt": ""}, "prompt", "prompt must not be empty"),
        ({"model": "demo", "prompt": "x", "messages": CHAT}, "messages", "either prompt or messages, not both"),
        ({"model": "demo", "messages": []}, "messages", "messages must not be empty"),
        ({"model": "demo", "messages": [{"role": "robot", "content": "x"}]}, "messages", "robot"),
        ({"model": "demo", "messages": CHAT, "tools": [{"type": "function"}]}, "tools[0]", "tools[0]"),
        ({"model": "demo", "prompt": 5}, "prompt", "prompt must be a string"),
        ({"model": "demo", "prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens", "must be a boolean"),
        ({"prompt": "x"}, "model", "model is required"),
        ({"model": "", "prompt": "x"}, "model", "model must not be empty"),
        ({"model": "echo", "prompt": "x"}, "model", "offers no tokenizer"),  # a sim model's tokens are words
    ):
        await served.refused("/tokenize", body, 400, param, says)
    for tokens, says in (([1, 2048], "tokens[1] is 2048, outside the vocabulary"),
                         ([1, -1], "tokens[1] must be a token id"), ([1, 2**32], "tokens[1] must be a token id"),
                         (["a"], "tokens[0] must be a token id (an integer from 0"), ([True], "got a boolean"),
                         ([1.5], "got a number")):
        await served.refused("/detokenize", {"model": "demo", "tokens": tokens}, 400, "tokens", says)
    await served.refused("/detokenize", {"model": "demo"}, 400, "tokens", "tokens is required")
    await served.refused("/detokenize", {"model": "demo", "tokens": "1 2"}, 400, "tokens", "must be an array")

    # fields the API does not know are dropped and named, as for the other endpoints
    status, reply, headers = await served.post("/tokenize", {"model": "demo", "prompt": "x", "frobnicate": 1,
                                                             "add_generation_prompt": True})
    assert status == 200 and reply["count"] == 2
    assert headers["x-maas-ignored-fields"] == "frobnicate, add_generation_prompt"
    status, _, headers = await served.post("/detokenize", {"model": "demo", "tokens": [1]})
    assert status == 200 and "x-maas-ignored-fields" not in headers
