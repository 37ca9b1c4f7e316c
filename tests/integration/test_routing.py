"""Routing policies through a real router: prefix and session affinity, least load."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from maas.mesh.clients import dial
from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from .conftest import MeshHarness, eventually

SYSTEM = "You answer questions about the standard library, briefly and exactly. " * 4


async def served_by(mesh: MeshHarness, prompt: str, session: str = "") -> str:
    stub = await mesh.stub("router")
    metadata = (("x-session-id", session),) if session else ()
    response = await stub.Generate(inference_pb2.GenerateRequest(  # type: ignore[attr-defined]
        model="echo", prompt=prompt, params=common_pb2.SamplingParams(max_tokens=1)), metadata=metadata, timeout=10)
    return response.replica_id  # type: ignore[no-any-return]


async def test_prefix_and_session_affinity_and_least_load(mesh: MeshHarness):
    await mesh.core()
    await mesh.worker()
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo", replicas=2)
    await mesh.wait_ready("echo", replicas=2)

    # one shared system prompt: every request goes where its prefix is cached
    shared = {await served_by(mesh, SYSTEM + f"question {i}") for i in range(12)}
    assert len(shared) == 1
    # a session sticks to its replica whatever the prompt
    for session in ("alice", "bob", "carol"):
        assert len({await served_by(mesh, f"turn {i}", session) for i in range(6)}) == 1
    # short prompts without affinity spread by load over both replicas
    spread = await asyncio.gather(*(served_by(mesh, f"hi {i}") for i in range(24)))
    assert len(set(spread)) == 2


async def test_router_metrics_count_requests_tokens_and_latency(mesh: MeshHarness):
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    await mesh.core()
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    before = (value("maas_router_requests_total", model="echo", tenant="-", status="OK"),
              value("maas_router_tokens_total", model="echo", tenant="-", kind="completion"),
              value("maas_router_time_to_first_token_seconds_count", model="echo"),
              value("maas_router_requests_total", model="other", tenant="-", status="NOT_FOUND"))
    await mesh.generate("echo", max_tokens=3)
    await served_by(mesh, "hello")
    try:
        await mesh.generate("no-such-model")
    except Exception:
        pass
    after = (value("maas_router_requests_total", model="echo", tenant="-", status="OK"),
             value("maas_router_tokens_total", model="echo", tenant="-", kind="completion"),
             value("maas_router_time_to_first_token_seconds_count", model="echo"),
             value("maas_router_requests_total", model="other", tenant="-", status="NOT_FOUND"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 4, 1, 1]


async def test_a_full_model_sheds_at_once_or_queues_briefly_when_asked(mesh: MeshHarness):
    import grpc
    import pytest

    await mesh.registry()
    await mesh.scheduler()
    await mesh.router()  # default: no waiting in the router
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="50", max_running="1")  # one request at a time
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")

    router = await mesh.stub("router")
    long = router.GenerateStream(inference_pb2.GenerateRequest(  # type: ignore[attr-defined]
        model="echo", prompt="hi", params=common_pb2.SamplingParams(max_tokens=200, ignore_eos=True)), timeout=60)
    await long.read()  # about 10 s: it holds the only slot
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate("echo", max_tokens=2)  # full: refused at once
    assert not long.done()  # refused while the request holding the slot still runs
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at capacity" in err.value.details()
    assert dict(err.value.trailing_metadata() or ()).get("retry-after") == "1"
    # cancelled on the call itself: a cancelled task iterating a call made through client
    # interceptors may leave the RPC running until the call object is collected
    long.cancel()

    queueing = await mesh.router(queue_timeout=2.0)  # a router told to wait up to 2 s for room
    channel = dial(queueing.endpoint, mesh.admin_token)
    stub = inference_pb2_grpc.InferenceStub(channel)

    async def generate(max_tokens: int) -> list[inference_pb2.GenerateChunk]:
        request = inference_pb2.GenerateRequest(model="echo", prompt="hi",
                                                params=common_pb2.SamplingParams(max_tokens=max_tokens))
        return [c async for c in stub.GenerateStream(request, timeout=20)]

    short = asyncio.create_task(eventually_served(generate, 10))  # about 0.5 s, once the cancelled one has left
    await asyncio.sleep(0.3)
    waited = await generate(2)  # full: waits for room, then runs
    assert waited[-1].usage.completion_tokens == 2
    assert (await short)[-1].usage.completion_tokens == 10
    await channel.close()


async def eventually_served(generate: object, max_tokens: int) -> list[inference_pb2.GenerateChunk]:
    for _ in range(50):
        try:
            return await generate(max_tokens)  # type: ignore[operator,no-any-return]
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("never served")


async def test_a_grpc_call_without_a_deadline_gets_the_routers_default(mesh: MeshHarness) -> None:
    """--grpc-timeout bounds a call that set no deadline (as --http-timeout does for HTTP),
    and the worker drops the work when it expires; a call's own deadline takes precedence."""
    await mesh.registry()
    await mesh.scheduler()
    await mesh.router(grpc_timeout=1.0)
    replicas = await mesh.worker()
    await mesh.register("slow", token_delay_ms="100")  # 100 tokens take about 10 s
    await mesh.deploy("slow")
    await mesh.wait_ready("slow")
    stub = await mesh.stub("router")

    def request(tokens: int) -> inference_pb2.GenerateRequest:
        return inference_pb2.GenerateRequest(model="slow", prompt="x",
                                             params=common_pb2.SamplingParams(max_tokens=tokens))

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(request(100))  # type: ignore[attr-defined]
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    await eventually(lambda: replicas.in_flight == 0, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.GenerateStream(request(100)):  # type: ignore[attr-defined]
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    ok = await stub.Generate(request(15), timeout=30)  # type: ignore[attr-defined]
    assert ok.usage.completion_tokens == 15
