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
