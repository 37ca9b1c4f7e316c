"""Streams served by vLLM workers (`maas worker --engine vllm`) move to the other worker when
theirs is SIGKILLed, and continue with exactly the tokens of the fault-free run: greedy and
seeded sampled ones alike (engines/vllm_sampler.py). Skipped where MAAS_VLLM_PYTHON names
no environment with vLLM (`make test` makes one)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from maas.v1 import common_pb2, inference_pb2

from .conftest import MeshHarness, eventually
from .test_migration import _workers
from .test_vllm_engine import needs_vllm

pytestmark = [pytest.mark.slow, needs_vllm]

STREAMS = 8
MAX_TOKENS = 160  # long enough that every stream is still running when the worker dies (~1 s in)


async def test_vllm_streams_move_off_a_killed_worker_with_the_same_tokens(mesh: MeshHarness, demo_model_dir: Path):
    await mesh.core()
    # the default lease (5 s), not the harness's 2 s: the surviving worker, relaying eight moved
    # streams while its vLLM engine process takes both cores, once missed keepalives for 2 s in
    # CI, and its replica left etcd with nowhere for the streams to go
    workers = {w: mesh.spawn("worker", "--instance", w, "--cpu-memory-gib", "3", "--engine", "vllm",
                             "--lease-ttl", "5")
               for w in ("w1", "w2")}
    await eventually(lambda: _workers(mesh, 2), timeout=30)
    await mesh.register("demo", fmt="hf", source=str(demo_model_dir), kv_cache_mb="64", max_adapters="0")
    await mesh.deploy("demo", replicas=2)
    st = await mesh.wait_ready("demo", replicas=2, timeout=240)  # two vLLM engines loading on 2 cores
    assert {r.worker_id for r in st.replicas} == {"w1", "w2"}
    stub = await mesh.stub("router")

    def params(i: int) -> common_pb2.SamplingParams:
        sampled = {"seed": 500 + i, "temperature": 0.9, "top_p": 0.95} if i % 2 else {"temperature": 0.0}
        # a stop string that never matches: text that could begin it is held back until it cannot
        return common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=["@@@@ never @@@@"],
                                         **sampled)  # type: ignore[arg-type]

    async def stream(i: int, first: dict[int, str] | None = None) -> tuple[list[int], str, set[str]]:
        request = inference_pb2.GenerateRequest(model="demo", prompt=f"def function_{i}(x):", params=params(i))
        tokens: list[int] = []
        text, replicas = "", set()
        async for chunk in stub.GenerateStream(request, timeout=120):  # type: ignore[attr-defined]
            tokens += chunk.token_ids
            text += chunk.text
            replicas.add(chunk.replica_id)
            if first is not None and len(tokens) >= 5:
                first.setdefault(i, chunk.replica_id)
        return tokens, text, replicas

    expected = await asyncio.gather(*(stream(i) for i in range(STREAMS)))
    assert all(len(tokens) == MAX_TOKENS for tokens, _, _ in expected)
    moved_before = REGISTRY.get_sample_value("maas_router_migrations_total", {"model": "demo"}) or 0.0

    # where each stream runs is the router's choice: kill the worker serving the most sampled
    # streams, once every stream is under way, so that a sampled one is certain to be moved
    first: dict[int, str] = {}
    runs = [asyncio.create_task(stream(i, first)) for i in range(STREAMS)]
    await eventually(lambda: len(first) == STREAMS, timeout=60)
    worker_of = {r.replica_id: r.worker_id for r in st.replicas}
    sampled_on = {w: sum(1 for i, rid in first.items() if i % 2 and worker_of[rid] == w) for w in workers}
    victim = max(sampled_on, key=lambda w: sampled_on[w])
    workers[victim].signal(signal.SIGKILL)
    got = await asyncio.gather(*runs)  # raises if a stream failed

    for i, ((tokens, text, _), (want_tokens, want_text, _)) in enumerate(zip(got, expected, strict=True)):
        assert tokens == want_tokens, f"stream {i} ({'sampled' if i % 2 else 'greedy'}) differs from the fault-free run"
        assert text == want_text, f"stream {i}: text differs"
    # streams that ran on both workers were moved mid-answer (one on the killed worker may also
    # have finished before the kill); the point is a sampled one among them
    moved = [i for i, (_, _, replicas) in enumerate(got) if len(replicas) == 2]
    assert any(i % 2 for i in moved), f"no sampled stream was moved (moved: {moved})"
    count = (REGISTRY.get_sample_value("maas_router_migrations_total", {"model": "demo"}) or 0.0) - moved_before
    assert count >= len(moved)
    # vLLM's KV events reach the router, renamed into the blocks it routes by (kvblocks.py)
    survivor = next(r.replica_id for r in st.replicas if r.worker_id != victim)
    assert mesh.router_pool is not None and mesh.router_pool.kv is not None
    index = mesh.router_pool.kv.index
    await eventually(lambda: index.held(survivor) > 0, timeout=30)
