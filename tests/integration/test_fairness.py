"""Fair sharing through the whole path (issue 14): a quiet tenant's time to first token
while another tenant floods the same replica, against its own time alone, measured in the
same run (a ratio, never an absolute time). Real etcd, NATS, registry, scheduler, router,
and a worker whose engine (the forged demo model) runs in a process of its own."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from maas.mesh.clients import dial
from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2_grpc

from .conftest import MeshHarness, eventually

SAMPLES = 40


async def _ttft(stub: inference_pb2_grpc.InferenceStub, prompt: str, max_tokens: int) -> float:
    start = time.perf_counter()
    call = stub.GenerateStream(inference_pb2.GenerateRequest(
        model="demo", prompt=prompt, params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                      ignore_eos=True)), timeout=60)
    first = None
    async for chunk in call:
        if first is None and chunk.token_ids:
            first = time.perf_counter() - start
    assert first is not None
    return first


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def test_a_quiet_tenants_ttft_holds_while_another_tenant_floods(mesh: MeshHarness, demo_model_dir: Path):
    await mesh.registry()
    await mesh.scheduler()
    router = await mesh.router()
    await mesh.worker()
    await mesh.register("demo", fmt="hf", source=str(demo_model_dir), max_batch="4", max_queue="4")
    await mesh.deploy("demo")
    await mesh.wait_ready("demo", timeout=120)
    quiet_channel = dial(router.endpoint, await mesh.key("quiet"))
    flood_channel = dial(router.endpoint, await mesh.key("flood"))
    quiet = inference_pb2_grpc.InferenceStub(quiet_channel)
    flood = inference_pb2_grpc.InferenceStub(flood_channel)
    for _ in range(3):  # warm up
        await _ttft(quiet, "def add(a, b):", 4)
    alone = [await _ttft(quiet, "def add(a, b):", 4) for _ in range(SAMPLES)]

    started = 0
    refused = 0

    async def flooding(i: int) -> None:
        nonlocal started, refused
        while True:
            try:
                call = flood.GenerateStream(inference_pb2.GenerateRequest(
                    model="demo", prompt=f"import os\n# {i}\n", params=common_pb2.SamplingParams(
                        max_tokens=48, temperature=0, ignore_eos=True)), timeout=60)
                async for _ in call:
                    started += 1
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refused += 1
                await asyncio.sleep(0.5)  # as a client honouring the retry hint would, roughly

    tasks = [asyncio.create_task(flooding(i)) for i in range(16)]  # 4x the batch: the queue stays full
    try:
        await eventually(lambda: started > 200 and refused > 8, timeout=60)
        crowded = [await _ttft(quiet, "def add(a, b):", 4) for _ in range(SAMPLES)]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ratios = {q: _p(crowded, q) / _p(alone, q) for q in (0.5, 0.9, 0.99)}
    print(f"quiet TTFT alone p50 {_p(alone, 0.5) * 1000:.1f} ms p99 {_p(alone, 0.99) * 1000:.1f} ms; "
          f"under the flood p50 {_p(crowded, 0.5) * 1000:.1f} ms p99 {_p(crowded, 0.99) * 1000:.1f} ms; "
          f"ratios {' '.join(f'p{round(q * 100)} {r:.2f}' for q, r in ratios.items())}")
    # First come first served made this ratio about 100 (issue 14: 1,821 against 17 ms at
    # the median); fair sharing keeps it to what a fuller batch costs. The bound is
    # generous: here the router, the worker's front and both tenants' clients share one
    # process and two cores, and alone the first token takes a few milliseconds, so a
    # millisecond of jitter moves the ratio a lot. bench/fairness.py measures the p99
    # ratio against its goal of 1.5 with every service in its own process.
    assert ratios[0.5] <= 3.0 and ratios[0.9] <= 4.0, (ratios, alone, crowded)
    await quiet_channel.close()
    await flood_channel.close()


async def test_a_keys_weight_is_the_admins_to_set(mesh: MeshHarness):
    from maas.v1 import registry_pb2

    await mesh.registry()
    admin = await mesh.stub("registry")
    made = await admin.CreateKey(registry_pb2.CreateKeyRequest(tenant="big", weight=3), timeout=10)  # type: ignore[attr-defined]
    assert made.info.weight == 3
    for weight, code in ((-1, grpc.StatusCode.INVALID_ARGUMENT), (float("nan"), grpc.StatusCode.INVALID_ARGUMENT),
                         (5000, grpc.StatusCode.INVALID_ARGUMENT)):
        try:
            await admin.CreateKey(registry_pb2.CreateKeyRequest(tenant="big", weight=weight), timeout=10)  # type: ignore[attr-defined]
            raise AssertionError(f"weight {weight} was accepted")
        except grpc.aio.AioRpcError as e:
            assert e.code() == code and "weight" in (e.details() or ""), e
    developer = registry_pb2_grpc.RegistryStub(dial(mesh.endpoint("registry"), await mesh.key("big", "developer")))
    try:
        await developer.CreateKey(registry_pb2.CreateKeyRequest(tenant="big", weight=10), timeout=10)
        raise AssertionError("a tenant raised its own weight")
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "weight" in (e.details() or "")
    assert (await developer.CreateKey(registry_pb2.CreateKeyRequest(tenant="big"), timeout=10)).info.weight == 0


async def test_a_request_asks_its_class_within_its_keys(mesh: MeshHarness):
    from openai import AsyncOpenAI, BadRequestError, PermissionDeniedError

    from maas.v1 import registry_pb2

    router = await mesh.serving()
    admin = await mesh.stub("registry")
    urgent = await admin.CreateKey(registry_pb2.CreateKeyRequest(tenant="t", service_class="interactive"),  # type: ignore[attr-defined]
                                   timeout=10)
    base_url = f"http://{router.info.http_endpoint}/v1"
    plain = AsyncOpenAI(base_url=base_url, api_key=await mesh.key("t"), max_retries=0)
    first = AsyncOpenAI(base_url=base_url, api_key=urgent.key, max_retries=0)
    hello = [{"role": "user", "content": "hello"}]
    for tier in ("auto", "default", "flex", "standard", "batch"):  # at most its own class (standard)
        assert (await plain.chat.completions.create(model="echo", messages=hello, max_tokens=2,  # type: ignore[arg-type]
                                                    service_tier=tier)).choices  # type: ignore[arg-type]
    with pytest.raises(PermissionDeniedError, match="may ask for class 'standard' at most, not 'interactive'"):
        await plain.chat.completions.create(model="echo", messages=hello, max_tokens=2,  # type: ignore[arg-type]
                                            service_tier="priority")
    with pytest.raises(BadRequestError, match="service_tier must be one of"):
        await plain.chat.completions.create(model="echo", messages=hello, max_tokens=2,  # type: ignore[arg-type]
                                            service_tier="urgent")  # type: ignore[arg-type]
    assert (await first.chat.completions.create(model="echo", messages=hello, max_tokens=2,  # type: ignore[arg-type]
                                                service_tier="priority")).choices
    # a tenant's developer cannot mint an interactive key for itself
    developer = registry_pb2_grpc.RegistryStub(dial(mesh.endpoint("registry"), await mesh.key("t", "developer")))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await developer.CreateKey(registry_pb2.CreateKeyRequest(tenant="t", service_class="interactive"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await plain.close()
    await first.close()


# -- provisioned throughput (docs/fairness.md#provisioned-throughput) ---------------------------


async def test_reservations_size_the_deployment_or_are_refused(mesh: MeshHarness, capsys: pytest.CaptureFixture[str]):
    from maas.v1 import scheduler_pb2, scheduler_pb2_grpc

    from .test_cli_deploy import cli

    await mesh.core()
    await mesh.worker(memory_gib=4)  # 8 replicas of 512 MiB fit
    await mesh.register("echo", memory_mib=512)
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    admin = await mesh.stub("scheduler")

    async def refused(code: grpc.StatusCode, stub: object, **reserve: object) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Reserve(scheduler_pb2.ReserveRequest(deployment="echo", **reserve), timeout=10)  # type: ignore[attr-defined]
        assert e.value.code() == code, e.value
        return e.value.details() or ""

    assert "what one replica of 'echo' makes is not known" in await refused(
        grpc.StatusCode.FAILED_PRECONDITION, admin, tenant="acme", tokens_per_s=100)
    st = await admin.Reserve(scheduler_pb2.ReserveRequest(  # type: ignore[attr-defined]
        deployment="echo", tenant="acme", tokens_per_s=200, replica_tokens_per_s=100), timeout=10)
    assert st.deployment.replicas == 3  # 200 tokens/s at 80% of 100 per replica
    assert dict(st.deployment.reservations) == {"acme": 200}
    await mesh.wait_ready("echo", replicas=3)
    assert "needs 15 replicas of 100 tokens/s" in (why := await refused(
        grpc.StatusCode.FAILED_PRECONDITION, admin, tenant="globex", tokens_per_s=1000)) and "can hold 8" in why, why
    # scaling below what the reservations need is refused; a tenant's reservation is the admin's to set
    dep = (await admin.GetDeployment(scheduler_pb2.GetDeploymentRequest(name="echo"), timeout=5)).deployment  # type: ignore[attr-defined]
    dep.replicas = 1
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await admin.UpdateDeployment(scheduler_pb2.UpdateDeploymentRequest(deployment=dep), timeout=10)  # type: ignore[attr-defined]
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "need 3 replicas" in (e.value.details() or "")
    developer = scheduler_pb2_grpc.SchedulerStub(dial(mesh.endpoint("scheduler"), await mesh.key("globex", "developer")))
    await refused(grpc.StatusCode.PERMISSION_DENIED, developer, tenant="globex", tokens_per_s=10)
    # a tenant sees its own reservation only
    rc, out, err = await cli(mesh, capsys, "deploy", "reserve", "echo", "--tenant", "globex", "--tokens-per-s", "40")
    assert rc == 0 and "40 tokens/s reserved for tenant globex; 240 tokens/s reserved in all, 3 replicas" in out, err
    seen = (await developer.GetDeployment(scheduler_pb2.GetDeploymentRequest(name="echo"), timeout=5)).deployment
    assert dict(seen.reservations) == {"globex": 40}
    st = await admin.Reserve(scheduler_pb2.ReserveRequest(deployment="echo", tenant="acme", tokens_per_s=0), timeout=10)  # type: ignore[attr-defined]
    assert dict(st.deployment.reservations) == {"globex": 40}
    # a tenant cannot give itself a reservation another way: not when creating a deployment,
    # nor by marking its requests reserved
    await mesh.register("mine", memory_mib=64)
    made = await developer.CreateDeployment(scheduler_pb2.CreateDeploymentRequest(deployment=scheduler_pb2.Deployment(
        name="mine", replicas=1, reservations={"globex": 10**6}, replica_tokens_per_s=1)), timeout=10)
    assert not made.deployment.reservations and not made.deployment.replica_tokens_per_s
    router = inference_pb2_grpc.InferenceStub(dial(mesh.endpoint("router"), await mesh.key("globex")))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await router.Generate(inference_pb2.GenerateRequest(model="echo", prompt="hi", reserved=True), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in (e.value.details() or "")


async def test_a_reserved_request_goes_ahead_of_its_class(mesh: MeshHarness, demo_model_dir: Path):
    """Two slots, held one each by two tenants' long streams. A second request of a tenant
    without a reservation waits for a slot (it holds its fair share already); the same of a
    tenant with one pre-empts the other tenant and starts while both streams still run."""
    from maas.services.router import main as router_main
    from maas.v1 import scheduler_pb2

    await mesh.registry()
    await mesh.scheduler()
    router = await mesh._runtime("router")
    pool = await router_main.build(router)
    await mesh.worker()
    await mesh.register("demo", fmt="hf", source=str(demo_model_dir), max_batch="2", max_queue="4")
    await mesh.deploy("demo")
    await mesh.wait_ready("demo", timeout=120)
    admin = await mesh.stub("scheduler")
    await admin.Reserve(scheduler_pb2.ReserveRequest(  # type: ignore[attr-defined]
        deployment="demo", tenant="reserved", tokens_per_s=1000, replica_tokens_per_s=2000), timeout=10)
    await eventually(lambda: "reserved" in pool.deployments.items["demo"].reservations, timeout=10)
    stubs = {t: inference_pb2_grpc.InferenceStub(dial(router.endpoint, await mesh.key(t)))
             for t in ("reserved", "plain", "other")}

    async def stream(tenant: str, tokens: int, times: dict[str, float], name: str,
                     counts: dict[str, int]) -> None:
        call = stubs[tenant].GenerateStream(inference_pb2.GenerateRequest(
            model="demo", prompt=f"# {name}\n", params=common_pb2.SamplingParams(
                max_tokens=tokens, temperature=0, ignore_eos=True)), timeout=120)
        async for chunk in call:
            counts[name] = counts.get(name, 0) + len(chunk.token_ids)
            if chunk.token_ids and f"{name} first" not in times:
                times[f"{name} first"] = time.perf_counter()
                if name == "second":  # how far the held streams had got when it started
                    times["held tokens"] = max(counts.get("mine", 0), counts.get("other", 0))
        times[f"{name} end"] = time.perf_counter()

    for tenant in ("plain", "reserved"):
        times: dict[str, float] = {}
        counts: dict[str, int] = {}
        held = [asyncio.create_task(stream(tenant, 400, times, "mine", counts)),
                asyncio.create_task(stream("other", 400, times, "other", counts))]
        await eventually(lambda t=times: "mine first" in t and "other first" in t, timeout=30)  # type: ignore[misc]
        await stream(tenant, 4, times, "second", counts)
        await asyncio.gather(*held)
        # started while both held streams ran: well before either had its 400 tokens (the
        # client's view of a stream's end lags the engine's by a chunk or two, so an end
        # seen just after the second's start does not mean both still ran)
        both_running = times["held tokens"] < 300
        assert both_running == (tenant == "reserved"), (tenant, times)


async def test_a_reserved_tenant_gets_its_tokens_per_second_under_contention(
        mesh: MeshHarness, demo_model_dir: Path):
    """Provisioned throughput as a rate. Seven tenants keep four streams each on a replica
    of four slots, through the first of two routers (as clients held to one router by a
    kept-alive connection). Without reservations each gets about a seventh of the tokens
    made. Then tenant acme is given 70% of the throughput just measured: a moment later, it
    gets at least 75% of that rate, the replica makes at least half of what it did, and the
    others share what is left. (When each router spent its own share of the rate, acme got
    137 of 200 tokens/s here, failing: the engine counts what every router sends it.)"""
    from maas.v1 import scheduler_pb2

    await mesh.registry()
    await mesh.scheduler()
    router = await mesh.router()
    pool = mesh.router_pool
    assert pool is not None
    await mesh.router()  # a second router, which these clients do not use
    await mesh.worker()
    await mesh.register("demo", fmt="hf", source=str(demo_model_dir), max_batch="4", max_queue="32")
    await mesh.deploy("demo")
    await mesh.wait_ready("demo", timeout=120)
    tenants = ("acme", "b", "c", "d", "e", "f", "g")
    stubs = {t: inference_pb2_grpc.InferenceStub(dial(router.endpoint, await mesh.key(t))) for t in tenants}
    made: list[tuple[float, str, int]] = []  # (when, tenant, tokens) as the clients saw them

    async def flooding(tenant: str, i: int) -> None:
        while True:
            call = stubs[tenant].GenerateStream(inference_pb2.GenerateRequest(
                model="demo", prompt=f"# {tenant} {i}\n", params=common_pb2.SamplingParams(
                    max_tokens=32, temperature=0, ignore_eos=True)), timeout=60)
            async for chunk in call:
                if chunk.token_ids:
                    made.append((time.monotonic(), tenant, len(chunk.token_ids)))

    async def rates(seconds: float) -> dict[str, float]:
        """Tokens per second each tenant got over the next `seconds`."""
        start = time.monotonic()
        await asyncio.sleep(seconds)
        end = time.monotonic()
        return {t: sum(n for at, who, n in made if start <= at < end and who == t) / (end - start) for t in tenants}

    tasks = [asyncio.create_task(flooding(t, i)) for t in tenants for i in range(4)]
    try:
        await asyncio.sleep(2)  # every stream under way
        before = await rates(5)
        total = sum(before.values())
        reserved = 0.7 * total
        admin = await mesh.stub("scheduler")
        st = await admin.Reserve(scheduler_pb2.ReserveRequest(  # type: ignore[attr-defined]
            deployment="demo", tenant="acme", tokens_per_s=int(reserved), replica_tokens_per_s=int(total) + 1),
            timeout=10)
        assert st.deployment.replicas == 1  # 70% fits within the 80% of one replica that may be reserved
        await eventually(lambda: "acme" in pool.deployments.items["demo"].reservations, timeout=10)
        await asyncio.sleep(2)  # the reservation reached the replica with acme's next requests
        after = await rates(6)
    finally:
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = [r for r in results if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)]
    assert not failed, failed  # nothing refused or failed: the queue holds every stream
    print(f"tokens/s before: {before} (total {total:.0f}); acme reserved {reserved:.0f}; after: {after}")
    # unreserved, acme got its seventh, well under the reservation it is about to get (so the
    # check below fails where the reservation does nothing)
    assert 0.07 < before["acme"] / total < 0.25, before
    assert before["acme"] < 0.5 * reserved, (before, reserved)
    # reserved, it gets its rate, or, should the machine make fewer tokens in this window (two
    # shared cores), most of what there is; the others share what is left, none starved
    # reserved, it gets its rate, and the replica makes about what it made (pre-empting for
    # the reservation must not cost the throughput it is a share of); the others share what
    # is left, none starved, while the replica makes enough for the reservation to leave any
    now = sum(after.values())
    assert now > 0.5 * total, (before, after)
    assert after["acme"] >= 0.75 * reserved, (after, reserved)
    if reserved <= 0.8 * now:
        assert all(after[t] > 0.02 * now for t in tenants[1:]), after
