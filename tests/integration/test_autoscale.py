"""Autoscaling on load, scale to zero and cold start, and LRU eviction of idle replicas."""

from __future__ import annotations

import asyncio
import time

from maas.mesh.events import read_events
from maas.v1 import scheduler_pb2

from .conftest import MeshHarness, eventually


async def deployment(mesh: MeshHarness, name: str) -> scheduler_pb2.DeploymentStatus:
    stub = await mesh.stub("scheduler")
    return await stub.GetDeployment(scheduler_pb2.GetDeploymentRequest(name=name), timeout=5)  # type: ignore[attr-defined]


async def event_kinds(mesh: MeshHarness, entity_id: str) -> list[str]:
    return [f"{e.entity}.{e.what}" async for e in read_events(mesh.nats, mesh.prefix, follow=False)
            if e.entity_id == entity_id]


async def test_scale_to_zero_and_cold_start(mesh: MeshHarness):
    await mesh.registry()
    await mesh.scheduler()
    await mesh.router(cold_start_timeout=20)
    await mesh.worker()
    await mesh.register("lazy", token_delay_ms="1")
    # min 0 and no replicas asked for: nothing loads until the first request
    st = await mesh.deploy("lazy", replicas=0,
                           autoscale=scheduler_pb2.Autoscale(min_replicas=0, max_replicas=2, cooldown_seconds=2))
    assert st.deployment.replicas == 0 and not st.replicas

    started = time.monotonic()
    chunks = await mesh.generate("lazy", max_tokens=3)  # a cold start, not an error
    cold = time.monotonic() - started
    assert chunks[-1].usage.completion_tokens == 3
    print(f"cold start (sim engine, in-process worker): {cold:.2f}s")
    assert (await deployment(mesh, "lazy")).deployment.replicas == 1

    # idle for the cool-down: back to zero, and the replica is unloaded
    async def at_zero() -> bool:
        st = await deployment(mesh, "lazy")
        return st.deployment.replicas == 0 and not st.replicas
    await eventually(at_zero, timeout=20)

    # and back again, concurrent requests sharing one cold start
    results = await asyncio.gather(*(mesh.generate("lazy", max_tokens=2) for _ in range(4)))
    assert all(r[-1].usage.completion_tokens == 2 for r in results)
    assert (await deployment(mesh, "lazy")).deployment.replicas == 1
    kinds = await event_kinds(mesh, "lazy")
    assert kinds.count("deployment.activated") == 2 and "deployment.scaled" in kinds, kinds


async def test_a_cold_start_slower_than_the_cooldown_is_not_undone(mesh: MeshHarness):
    await mesh.registry()
    await mesh.scheduler()
    await mesh.router(cold_start_timeout=20)
    await mesh.worker()
    await mesh.register("slow", token_delay_ms="1", load_delay_ms="4000")
    await mesh.deploy("slow", replicas=0,
                      autoscale=scheduler_pb2.Autoscale(min_replicas=0, max_replicas=1, cooldown_seconds=1.5))
    # loading takes longer than the cool-down: the scheduler must not scale it back meanwhile
    chunks = await mesh.generate("slow", max_tokens=2, timeout=20)
    assert chunks[-1].usage.completion_tokens == 2
    assert "deployment.scaled" not in await event_kinds(mesh, "slow")


async def test_a_fixed_deployment_at_zero_says_how_to_scale_it(mesh: MeshHarness):
    import grpc
    import pytest

    await mesh.core()
    await mesh.register("off")
    await mesh.deploy("off", replicas=0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.generate("off")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "scaled to 0 replicas" in err.value.details() and "maas deploy scale off" in err.value.details()


async def test_sustained_load_scales_up_and_the_cooldown_scales_back(mesh: MeshHarness):
    await mesh.core()
    await mesh.worker()
    await mesh.worker()
    await mesh.register("busy", token_delay_ms="20")
    await mesh.deploy("busy", replicas=1, autoscale=scheduler_pb2.Autoscale(
        min_replicas=1, max_replicas=3, target_in_flight=2, scale_up_seconds=0.5, cooldown_seconds=2))
    await mesh.wait_ready("busy")

    async def stream() -> None:  # about 4 s each
        chunks = await mesh.generate("busy", max_tokens=200, ignore_eos=True, timeout=30)
        assert chunks[-1].usage.completion_tokens == 200

    load = [asyncio.create_task(stream()) for _ in range(6)]  # 6 in flight, target 2 each: 3 replicas
    await eventually(lambda: _replicas(mesh, "busy", 3), timeout=15)
    await mesh.wait_ready("busy", replicas=3)
    await asyncio.gather(*load)
    await eventually(lambda: _replicas(mesh, "busy", 1), timeout=20)  # min 1: never to zero


async def _replicas(mesh: MeshHarness, name: str, n: int) -> bool:
    return (await deployment(mesh, name)).deployment.replicas == n


async def test_a_full_worker_evicts_the_least_recently_used_idle_model(mesh: MeshHarness):
    await mesh.registry()
    await mesh.scheduler(evict_idle_seconds=0.5)
    await mesh.router(cold_start_timeout=20)
    await mesh.worker(memory_gib=1.0)  # room for two of the 400 MiB models below, not three
    lazy = scheduler_pb2.Autoscale(min_replicas=0, max_replicas=1, cooldown_seconds=600)
    for name in ("older", "newer", "third"):
        await mesh.register(name, token_delay_ms="1", memory_mib=400)
    await mesh.deploy("older", autoscale=lazy)
    await mesh.deploy("newer", autoscale=lazy)
    await mesh.wait_ready("older")
    await mesh.wait_ready("newer")
    await mesh.generate("older", max_tokens=1)
    await asyncio.sleep(0.2)
    await mesh.generate("newer", max_tokens=1)  # "older" is now the least recently used

    await mesh.deploy("third")  # fixed size: it needs room now
    await mesh.wait_ready("third", timeout=20)
    assert (await deployment(mesh, "older")).deployment.replicas == 0
    assert (await deployment(mesh, "newer")).ready_replicas == 1
    assert "replica.evicted" in [f"{e.entity}.{e.what}"
                                 async for e in read_events(mesh.nats, mesh.prefix, follow=False)
                                 if e.attributes.get("deployment") == "older"]

    # the evicted model comes back on its next request, in place of the now least recently used one
    chunks = await mesh.generate("older", max_tokens=2)
    assert chunks[-1].usage.completion_tokens == 2
    assert (await deployment(mesh, "newer")).deployment.replicas == 0
    assert (await deployment(mesh, "third")).ready_replicas == 1  # fixed-size deployments are never evicted
