"""Pipelines delivered and observed like models: a pipeline deployment's canary is rolled
back on its own when it breaks the SLO its file declares, and promoted when it meets it;
a request's trace shows every step under its pipeline, from the client's span to the
worker's. Real etcd, NATS, registry, scheduler, routers and sim workers (the traced ones
as separate processes exporting over OTLP/HTTP to a collector in the test)."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from openai import AsyncOpenAI
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from maas.mesh.clients import dial
from maas.mesh.events import read_events
from maas.stack.servers import free_port
from maas.v1 import scheduler_pb2, scheduler_pb2_grpc

from .conftest import MeshHarness, eventually
from .test_cli_deploy import cli
from .test_pipelines import push

GOOD = """\
steps:
  - name: prompt
    kind: template
    template: "Say: {{ input.text }}"
  - name: answer
    kind: generate
    model: echo
    input: steps.prompt
    max_tokens: 4
    temperature: 0
slo:
  min_requests: 10
  promote_after: 20
  error_rate: 0.05
  steps:
    prompt: {error_rate: 0.05}
"""
# a new version whose template always fails: its fallback keeps every answer coming, but the
# step's error rate breaks the SLO
BROKEN = GOOD.replace('template: "Say: {{ input.text }}"',
                      'template: "{{ (1 / 0) if input.text else \'\' }}"\n'
                      '    on_error: fallback\n    fallback: "Say something"')


async def _ask(client: AsyncOpenAI, model: str, n: int) -> list[str]:
    replies = await asyncio.gather(*(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"hello {i}"}]) for i in range(n)))
    return [r.choices[0].message.content or "" for r in replies]


async def _until_decided(client: AsyncOpenAI, scheduler: scheduler_pb2_grpc.SchedulerStub, name: str,
                         timeout: float = 60.0) -> tuple[scheduler_pb2.Deployment, int]:
    """Ask the deployment in rounds until its canary is gone; (the deployment, answers got)."""
    answered = 0
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        replies = await _ask(client, name, 8)
        assert all(replies), replies  # every request is answered, whichever version ran it
        answered += len(replies)
        dep = (await scheduler.GetDeployment(scheduler_pb2.GetDeploymentRequest(name=name), timeout=5)).deployment
        if not dep.traffic:
            return dep, answered
        await asyncio.sleep(0.2)
    raise AssertionError(f"the canary of {name} was neither promoted nor rolled back in {timeout:g}s")


async def test_a_canary_that_breaks_its_slo_is_rolled_back_and_one_that_meets_it_is_promoted(
        mesh: MeshHarness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    router = await mesh.serving()
    key = await mesh.key("a")
    channel = dial(mesh.endpoint("registry"), key)
    from maas.v1 import registry_pb2_grpc

    registry = registry_pb2_grpc.RegistryStub(channel)
    name = f"rollbot{secrets.token_hex(3)}"
    for text in (GOOD, BROKEN):
        await push(registry, tmp_path, name, text)
    scheduler = scheduler_pb2_grpc.SchedulerStub(dial(mesh.endpoint("scheduler"), key))
    created = (await scheduler.CreateDeployment(scheduler_pb2.CreateDeploymentRequest(
        deployment=scheduler_pb2.Deployment(name=name, model=f"{name}@1", replicas=1)), timeout=10)).deployment
    assert (created.format, created.replicas, created.resolved_version) == ("pipeline", 0, f"{name}@1")
    client = AsyncOpenAI(base_url=f"http://{router.info.http_endpoint}/v1", api_key=key, max_retries=0)
    assert all(await _ask(client, name, 4))

    # the broken version as a canary at half the traffic: rolled back on the step's error rate
    dep = created
    dep.traffic.add(model=f"{name}@2", weight=50)
    await scheduler.UpdateDeployment(scheduler_pb2.UpdateDeploymentRequest(deployment=dep), timeout=10)
    dep, answered = await _until_decided(client, scheduler, name)
    assert dep.resolved_version == f"{name}@1" and not dep.traffic
    assert dep.rollout_note.startswith(f"canary {name}@2 rolled back: step 'prompt': "), dep.rollout_note
    assert "failed" in dep.rollout_note and "error_rate 0.05" in dep.rollout_note
    events = [e async for e in read_events(mesh.nats, mesh.prefix, follow=False, entity="deployment",
                                                 what="rolled_back")]
    assert any(e.entity_id == name and e.attributes["canary"] == f"{name}@2" for e in events)

    # a good version as the next canary: promoted once it met the SLO over promote_after requests
    await push(registry, tmp_path, name, GOOD.replace("Say:", "Tell:"))
    del dep.traffic[:]
    dep.traffic.add(model=f"{name}@3", weight=50)
    await scheduler.UpdateDeployment(scheduler_pb2.UpdateDeploymentRequest(deployment=dep), timeout=10)
    dep, _ = await _until_decided(client, scheduler, name)
    assert (dep.resolved_version, dep.previous_version) == (f"{name}@3", f"{name}@1")
    assert dep.rollout_note.startswith(f"canary {name}@3 promoted: met every objective"), dep.rollout_note

    # what the CLI says about it
    rc, out, err = await cli(mesh, capsys, "pipeline", "list")
    assert rc == 0 and f"{name}: {name}@3" in out, (out, err)
    rc, out, err = await cli(mesh, capsys, "pipeline", "show", f"{name}@2")
    assert rc == 0 and "on_error fallback" in out and "model echo" in out, (out, err)
    assert "slo: window 60s, at least 10 requests, promoted after 20" in out
    assert "step 'prompt'" in out and "error_rate 0.05" in out
    rc, out, err = await cli(mesh, capsys, "deploy", "show", name)
    assert rc == 0 and "pipeline (run by the routers)" in out and f"canary {name}@3 promoted" in out, out
    await client.close()
    await channel.close()


# ---- traces ---------------------------------------------------------------------------------


class Collector:
    """An OTLP/HTTP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/traces", self._export)

    async def _export(self, request: web.Request) -> web.Response:
        body = trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read())
        for rs in body.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append({"service": service, "name": s.name, "trace": s.trace_id.hex(),
                                       "id": s.span_id.hex(), "parent": s.parent_span_id.hex()})
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def of(self, trace_id: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["trace"] == trace_id]


async def test_a_trace_shows_every_step_with_its_parent(mesh: MeshHarness, tmp_path: Path) -> None:
    collector = Collector()
    runner = web.AppRunner(collector.app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    try:
        await mesh.registry()
        await mesh.scheduler()
        mesh.spawn("worker", "--cpu-memory-gib", "1", env=otel)
        http_port = free_port()
        mesh.spawn("router", "--http-port", str(http_port), env=otel)
        await mesh.register("echo", token_delay_ms="5")
        await mesh.deploy("echo")
        await mesh.wait_ready("echo", timeout=60)
        key = await mesh.key("a")
        from maas.v1 import registry_pb2_grpc

        channel = dial(mesh.endpoint("registry"), key)
        await push(registry_pb2_grpc.RegistryStub(channel), tmp_path, "traced",
                   GOOD.split("slo:")[0] + "  - name: safe\n    kind: guard\n    input: steps.answer\n"
                                           "    block: [nothing-like-this]\n")
        await channel.close()
        base_url = f"http://127.0.0.1:{http_port}/v1"

        async def up() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(f"{base_url[:-3]}/health") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(up, timeout=60)

        async def answer(client: AsyncOpenAI) -> str:
            stream = await client.chat.completions.create(
                model="traced", messages=[{"role": "user", "content": "hi"}], stream=True)
            return "".join([e.choices[0].delta.content or "" async for e in stream if e.choices])

        async def answered() -> bool:  # the new router may not see the worker's replica at once
            try:
                async with AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as plain:
                    return bool(await answer(plain))
            except Exception:
                return False

        await eventually(answered, timeout=30)
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        async with AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0,
                               default_headers={"traceparent": f"00-{trace_id}-{client_span}-01"}) as client:
            assert await answer(client)

        def complete() -> bool:
            return any(s["service"] == "maas-worker" for s in collector.of(trace_id)) and \
                any(s["name"] == "step safe" for s in collector.of(trace_id))

        await eventually(complete, timeout=30)
        spans = collector.of(trace_id)
        by_name: dict[str, list[dict[str, Any]]] = {}
        for s in spans:
            by_name.setdefault(s["name"], []).append(s)
        (http_span,) = [s for s in by_name["POST /v1/chat/completions"] if s["parent"] == client_span]
        assert http_span["service"] == "maas-router"
        pipeline = [s for s in by_name["pipeline traced@1"] if s["parent"] == http_span["id"]]
        assert len(pipeline) == 1, spans
        for step in ("prompt", "answer", "safe"):
            (span,) = [s for s in by_name[f"step {step}"] if s["parent"] == pipeline[0]["id"]]
            assert span["service"] == "maas-router"
        (generate_span,) = by_name["step answer"]
        served = [s for s in spans if s["service"] == "maas-worker" and s["parent"] == generate_span["id"]]
        assert [s["name"] for s in served] == ["maas.v1.Inference/GenerateStream"], spans
    finally:
        await runner.cleanup()


# ---- capture and replay -------------------------------------------------------------------

CAPTURED = """\
capture: {rate: 1.0}
steps:
  - name: prompt
    kind: template
    template: "Say: {{ input.text }}"
  - name: answer
    kind: generate
    model: echo
    input: steps.prompt
    max_tokens: 6
    temperature: 0.9
"""


async def test_captured_requests_replay_against_a_new_version_step_by_step(
        mesh: MeshHarness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from maas.v1 import pipelines_pb2, pipelines_pb2_grpc, registry_pb2_grpc

    router = await mesh.serving()
    key_a, key_b = await mesh.key("a"), await mesh.key("b")
    channel = dial(mesh.endpoint("registry"), key_a)
    name = f"cap{secrets.token_hex(3)}"
    await push(registry_pb2_grpc.RegistryStub(channel), tmp_path, name, CAPTURED)
    client = AsyncOpenAI(base_url=f"http://{router.info.http_endpoint}/v1", api_key=key_a, max_retries=0)
    questions = ["one", "two", "three"]
    for q in questions:
        assert (await client.chat.completions.create(model=name, messages=[{"role": "user", "content": q}]))
    await push(registry_pb2_grpc.RegistryStub(channel), tmp_path, name, CAPTURED.replace("Say:", "Tell:"))

    router_channel = dial(mesh.endpoint("router"), key_a)
    pipelines = pipelines_pb2_grpc.PipelinesStub(router_channel)

    async def replay(new: str, old: str) -> list[pipelines_pb2.ReplayResult]:
        return [r async for r in pipelines.Replay(pipelines_pb2.ReplayRequest(pipeline=new, against=old), timeout=60)]

    async def captured() -> list[pipelines_pb2.ReplayResult] | None:
        got = await replay(f"{name}@1", f"{name}@1")
        return got if len(got) == len(questions) else None

    # the same version with the captured seeds: every step repeats (its sampling too)
    same = await eventually(captured, timeout=15)
    assert [r.question for r in same] == questions[::-1]  # type: ignore[union-attr]
    for r in same:  # type: ignore[union-attr]
        assert r.same_answer and not r.error, r
        assert [(s.step, s.old_status, s.new_status, s.same_output) for s in r.steps] == [
            ("prompt", "ok", "ok", True), ("answer", "ok", "ok", True)], r

    # the new version: the template's change, and what it did to the answer
    changed = await replay(f"{name}@2", f"{name}@1")
    assert len(changed) == 3 and all(not r.same_answer for r in changed)
    prompt = changed[0].steps[0]
    assert (prompt.step, prompt.same_output, prompt.old_output, prompt.new_output) == (
        "prompt", False, "Say: three", "Tell: three")

    # another tenant cannot see the pipeline, so cannot replay it
    other = dial(mesh.endpoint("router"), key_b)
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await pipelines_pb2_grpc.PipelinesStub(other).Replay(pipelines_pb2.ReplayRequest(
            pipeline=f"{name}@2", against=f"{name}@1"), timeout=10).read()
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND

    # the CLI, with the tenant's key
    rc, out, err = await cli(mesh, capsys, "pipeline", "replay", f"{name}@2", "--against", f"{name}@1",
                             "--api-key", key_a)
    assert rc == 0, err
    assert "3 requests replayed: 3 answers changed, 0 failed; steps changed: prompt in 3, answer in 3" in out, out
    rc, out, err = await cli(mesh, capsys, "pipeline", "test", f"{name}@2", "four", "--api-key", key_a)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[1] == "[finish: stop]" and lines[2].startswith(f"{name}@2: first chunk at "), out
    assert [line.split()[:3] for line in lines[3:]] == [["prompt", "template", "ok"], ["answer", "generate", "ok"]]
    for c in (channel, router_channel, other):
        await c.close()
    await client.close()
