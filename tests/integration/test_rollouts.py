"""Canary rollouts: weights honoured, rollback and promote without a failed request."""

from __future__ import annotations

import asyncio
import collections

import pytest

from maas.v1 import common_pb2, inference_pb2, scheduler_pb2

from .conftest import MeshHarness, eventually


async def served_by(mesh: MeshHarness, n: int, concurrency: int = 25) -> collections.Counter[str]:
    stub = await mesh.stub("router")
    counts: collections.Counter[str] = collections.Counter()

    async def one() -> None:
        reply = await stub.Generate(inference_pb2.GenerateRequest(  # type: ignore[attr-defined]
            model="echo", prompt="hi", params=common_pb2.SamplingParams(max_tokens=1)), timeout=10)
        counts[reply.model] += 1

    for start in range(0, n, concurrency):
        await asyncio.gather(*(one() for _ in range(min(concurrency, n - start))))
    return counts


async def update(mesh: MeshHarness, **fields: object) -> scheduler_pb2.DeploymentStatus:
    sched = await mesh.stub("scheduler")
    current = (await sched.GetDeployment(scheduler_pb2.GetDeploymentRequest(name="echo"), timeout=5)).deployment  # type: ignore[attr-defined]
    current.model = current.resolved_version
    del current.traffic[:]
    for key, value in fields.items():
        if key == "canary":
            current.traffic.add(model=value, weight=10)
        else:
            setattr(current, key, value)
    return await sched.UpdateDeployment(scheduler_pb2.UpdateDeploymentRequest(deployment=current), timeout=5)  # type: ignore[attr-defined]


async def ready_versions(mesh: MeshHarness) -> set[str]:
    sched = await mesh.stub("scheduler")
    st = await sched.GetDeployment(scheduler_pb2.GetDeploymentRequest(name="echo"), timeout=5)  # type: ignore[attr-defined]
    return {f"{r.model_name}@{r.model_version}" for r in st.replicas if r.state == 2}


async def test_canary_weight_rollback_and_promote(mesh: MeshHarness):
    await mesh.core()
    await mesh.worker()
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo", model="echo@1", replicas=2)
    await mesh.wait_ready("echo", replicas=2)

    status = await update(mesh, canary="echo@2")
    assert status.deployment.traffic[0].model == "echo@2"
    await eventually(lambda: _has(mesh, {"echo@1", "echo@2"}), timeout=20)
    counts = await served_by(mesh, 1000)
    share = counts["echo@2"] / sum(counts.values())
    assert 0.07 <= share <= 0.13, counts  # 10 % asked; 1,000 requests: about +-3 standard deviations

    # roll back while requests keep flowing: none fails, and the canary goes away
    background = asyncio.create_task(served_by(mesh, 400, concurrency=5))
    await update(mesh)
    await eventually(lambda: _has(mesh, {"echo@1"}), timeout=20)
    await background  # raises if any request failed
    assert set(await served_by(mesh, 50)) == {"echo@1"}

    # a new canary, promoted: all traffic moves to it, still without a failed request
    await update(mesh, canary="echo@2")
    await eventually(lambda: _has(mesh, {"echo@1", "echo@2"}), timeout=20)
    background = asyncio.create_task(served_by(mesh, 400, concurrency=5))
    await update(mesh, model="echo@2")
    await eventually(lambda: _has(mesh, {"echo@2"}), timeout=20)
    await background
    assert set(await served_by(mesh, 50)) == {"echo@2"}


async def _has(mesh: MeshHarness, versions: set[str]) -> bool:
    return await ready_versions(mesh) == versions


async def test_bad_canaries_are_refused(mesh: MeshHarness):
    import grpc

    await mesh.core()
    await mesh.register("echo")
    await mesh.deploy("echo")
    sched = await mesh.stub("scheduler")
    for split, field in ((scheduler_pb2.TrafficSplit(model="echo@1", weight=10), "already deployed"),
                         (scheduler_pb2.TrafficSplit(model="echo@1", weight=0), "weight"),
                         (scheduler_pb2.TrafficSplit(model="echo@7", weight=10), "no version")):
        dep = scheduler_pb2.Deployment(name="echo", model="echo@1", replicas=1, traffic=[split])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await sched.UpdateDeployment(scheduler_pb2.UpdateDeploymentRequest(deployment=dep), timeout=5)
        assert field in err.value.details(), err.value.details()
