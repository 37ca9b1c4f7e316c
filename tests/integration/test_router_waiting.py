"""The router's waiting room (docs/fairness.md#the-routers-waiting-room) with real
processes: a router started with --queue-timeout and a worker, each a process of its own.
The model serves one request at a time and refuses the rest (RESOURCE_EXHAUSTED with a
retry hint, as a full engine queue does), so every request that finds the slot taken waits
in the router. A quiet tenant's one request must not wait behind a flooding tenant's
earlier ones, and nothing waiting may be lost.

The model is the `sim` engine's (`max_running=1`, a fixed 20 ms a token), not the demo
model's: what is tested is the router's order, and the sim's slot is free exactly when its
stream ends, whatever the machine's speed. (The hf engine with `max_batch=1,max_queue=0`
shows the same, but how long its long stream holds the slot depends on the CPU: 50 s on
two loaded cores.)"""

from __future__ import annotations

import asyncio
import re

import httpx

from maas.mesh.clients import dial, live_services
from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc, mesh_pb2

from .conftest import MeshHarness, eventually

WAITING = 6  # the flooding tenant's requests that wait behind its long stream
ROUNDS = 3  # the scenario, again: with each waiter polling for room, the quiet request came anywhere
HELD = 300  # tokens of the stream that holds the slot (20 ms each)


async def _router(mesh: MeshHarness, instance: str) -> mesh_pb2.ServiceInfo:
    client = await mesh.client()

    async def found() -> mesh_pb2.ServiceInfo | None:
        return next((s for s in await live_services(client.etcd, client.keys, "router") if s.instance == instance),
                    None)

    return await eventually(found, timeout=60)  # type: ignore[return-value]


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample on a /metrics page (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_quiet_tenants_request_waiting_in_the_router_goes_before_a_floods(mesh: MeshHarness):
    await mesh.registry()
    await mesh.scheduler()
    router = mesh.spawn("router", "--instance", "fair", "--port", "0", "--http-port", "-1", "--metrics-port", "0",
                        "--queue-timeout", "60")
    worker = mesh.spawn("worker", "--instance", "w1", "--cpu-memory-gib", "2")
    await mesh.register("demo", token_delay_ms="20", max_running="1")  # one request at a time
    await mesh.deploy("demo")
    await mesh.wait_ready("demo", timeout=60)
    info = await _router(mesh, "fair")
    stubs = {t: inference_pb2_grpc.InferenceStub(dial(info.endpoint, await mesh.key(t))) for t in ("flood", "quiet")}
    metrics = httpx.AsyncClient(base_url=f"http://{info.metrics_endpoint}")

    def request(tenant: str, max_tokens: int, name: str) -> inference_pb2.GenerateRequest:
        return inference_pb2.GenerateRequest(model="demo", prompt=f"# {name}\n", params=common_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0, ignore_eos=True))

    async def served() -> bool:  # the router sees the replica
        return (await stubs["quiet"].Generate(request("quiet", 2, "warm"), timeout=10)).usage.completion_tokens == 2

    await eventually(served, timeout=30)

    firsts: list[str] = []  # names of requests in the order their first token came
    made: dict[str, int] = {}

    async def stream(tenant: str, max_tokens: int, name: str) -> None:
        async for chunk in stubs[tenant].GenerateStream(request(tenant, max_tokens, name), timeout=120):
            if chunk.token_ids and name not in firsts:
                firsts.append(name)
            if chunk.finish_reason:
                made[name] = chunk.usage.completion_tokens

    async def waiting(n: int) -> bool:
        page = (await metrics.get("/metrics")).text
        return _metric(page, "maas_router_waiting_requests", model="demo") >= n

    for rnd in range(ROUNDS):
        firsts.clear()
        made.clear()
        # the flood's long stream holds the only slot; its other requests, then the quiet
        # tenant's one, wait in the router
        held = asyncio.create_task(stream("flood", HELD, "held"))  # 6 s: every other request waits meanwhile
        await eventually(lambda: "held" in firsts, timeout=30)
        tasks = []
        for i in range(WAITING):
            tasks.append(asyncio.create_task(stream("flood", 4, f"flood-{i}")))
            await eventually(lambda n=i + 1: waiting(n), timeout=30, interval=0.01)  # type: ignore[misc]
        tasks.append(asyncio.create_task(stream("quiet", 4, "quiet")))
        await eventually(lambda: waiting(WAITING + 1), timeout=30, interval=0.01)
        assert not held.done(), "the long stream ended before every request waited: it must hold the slot longer"
        await asyncio.wait_for(asyncio.gather(held, *tasks), timeout=120)

        # nothing lost: every request got all its tokens
        assert made == {"held": HELD, "quiet": 4, **{f"flood-{i}": 4 for i in range(WAITING)}}, made
        # the quiet request's first token came before at least WAITING - 2 of the flood's
        # waiting requests' (with each waiter polling for room, it came anywhere)
        order = [name for name in firsts if name != "held"]
        ahead = order.index("quiet")
        print(f"round {rnd}: order of first tokens {order}")
        assert ahead <= 2, f"round {rnd}: {ahead} of the flood's waiting requests went first: {order}"

    page = (await metrics.get("/metrics")).text
    assert _metric(page, "maas_router_queue_wait_seconds_count", model="demo", tenant="quiet") == ROUNDS, page
    # each round's waiters; a round's long stream may wait too, sent right as the last round's
    # final token left but before the sim freed its slot
    flood_waits = _metric(page, "maas_router_queue_wait_seconds_count", model="demo", tenant="flood")
    assert ROUNDS * WAITING <= flood_waits <= ROUNDS * (WAITING + 1), page
    assert _metric(page, "maas_router_waiting_requests", model="demo") == 0
    assert re.search(r'maas_router_shed_requests_total\{model="demo"\} [1-9]', page) is None  # none refused
    await metrics.aclose()
    assert router.alive and worker.alive
