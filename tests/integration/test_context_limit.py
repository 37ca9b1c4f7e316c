"""max_tokens beyond the model's context, end to end: the worker's engine refuses it with
INVALID_ARGUMENT naming the context, and that reaches an HTTP client as a 400 (param
max_tokens) and a gRPC client as INVALID_ARGUMENT; an absurd value is refused at the door."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest
from openai import AsyncOpenAI

from maas.services.router import openai_api
from maas.v1 import common_pb2, inference_pb2

from .conftest import MeshHarness

DEMO_CONTEXT = 1024  # the forged demo model's max_position_embeddings
CHAT = [{"role": "user", "content": "def add(a, b):"}]


@dataclass
class Served:
    mesh: MeshHarness
    base_url: str
    key: str
    client: AsyncOpenAI


@pytest.fixture
async def served(mesh: MeshHarness, demo_model_dir: Path) -> AsyncIterator[Served]:
    router = await mesh.serving_hf(demo_model_dir)
    key = await mesh.key("acme")
    base_url = f"http://{router.info.http_endpoint}/v1"
    client = AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    yield Served(mesh, base_url, key, client)
    await client.close()


async def _post(s: Served, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{s.base_url}{path}", json=body,
                             headers={"Authorization": f"Bearer {s.key}"}) as resp:
            return resp.status, await resp.json()


async def test_max_tokens_beyond_the_context_is_a_400_naming_it(served: Served) -> None:
    for path, body in [("/completions", {"model": "demo", "prompt": "def add(a, b):", "max_tokens": 5000}),
                       ("/chat/completions", {"model": "demo", "messages": CHAT, "max_tokens": 5000}),
                       ("/chat/completions", {"model": "demo", "messages": CHAT, "max_completion_tokens": 5000,
                                              "stream": True})]:
        status, reply = await _post(served, path, body)
        error = reply["error"]
        assert isinstance(error, dict)
        assert status == 400 and error["param"] == "max_tokens" and error["type"] == "invalid_request_error"
        assert "max_tokens 5000 plus the prompt's" in error["message"]
        assert f"exceeds the model's context of {DEMO_CONTEXT} tokens" in error["message"]

    # through the openai client too
    with pytest.raises(openai.BadRequestError) as bad:
        await served.client.completions.create(model="demo", prompt="x = 1", max_tokens=DEMO_CONTEXT)
    assert bad.value.param == "max_tokens" and f"context of {DEMO_CONTEXT} tokens" in bad.value.message


async def test_an_absurd_max_tokens_is_refused_at_the_door(served: Served) -> None:
    status, reply = await _post(served, "/chat/completions",
                                {"model": "demo", "messages": CHAT, "max_tokens": 1_000_000_000})
    error = reply["error"]
    assert isinstance(error, dict)
    assert status == 400 and error["param"] == "max_tokens"
    assert error["message"] == f"max_tokens must be in [1, {openai_api.MAX_TOKENS}], got 1000000000"


async def test_what_fits_is_served(served: Served) -> None:
    reply = await served.client.completions.create(model="demo", prompt="def add(a, b):", max_tokens=4,
                                                   temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    # a chat that does not set max_tokens gets a default that leaves the prompt room
    chat = await served.client.chat.completions.create(model="demo", messages=CHAT, temperature=0)  # type: ignore[arg-type]
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage is not None
    assert chat.usage.completion_tokens <= openai_api.chat_max_tokens(DEMO_CONTEXT)


async def test_grpc_callers_get_invalid_argument_from_the_worker(served: Served) -> None:
    stub = await served.mesh.stub("router")
    request = inference_pb2.GenerateRequest(model="demo", prompt="def add(a, b):",
                                            params=common_pb2.SamplingParams(max_tokens=1_000_000_000))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.Generate(request, timeout=20)  # type: ignore[attr-defined]
    e = failed.value
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens 1000000000 plus the prompt's" in (e.details() or "")
    assert f"exceeds the model's context of {DEMO_CONTEXT} tokens" in (e.details() or "")
    assert ("maas-field", "max_tokens") in tuple(e.trailing_metadata() or ())


async def test_a_chat_without_max_tokens_whose_prompt_leaves_less_than_the_default_says_so(
        served: Served) -> None:
    long = [{"role": "user", "content": "x = 1\n" * 150}]  # about 620 tokens: over half the context
    status, reply = await _post(served, "/chat/completions", {"model": "demo", "messages": long})
    error = reply["error"]
    assert isinstance(error, dict)
    assert status == 400 and error["param"] == "max_tokens"
    default = openai_api.chat_max_tokens(DEMO_CONTEXT)
    assert error["message"].startswith(f"max_tokens {default} plus the prompt's ")
    assert error["message"].endswith(f"the request did not set max_tokens and a chat's default is {default}: "
                                     "set max_tokens (or max_completion_tokens) to what fits")
    status, reply = await _post(served, "/chat/completions",
                                {"model": "demo", "messages": long, "max_tokens": 100, "temperature": 0})
    assert status == 200, reply
