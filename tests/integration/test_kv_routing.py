"""KV-aware routing (router/kvroute.py) with the built-in engine: the workers relay the blocks
their prefix caches hold, the router fetches the model's tokenizer from a worker, names a
prompt's blocks, and sends prompts that share a cached prefix to the replica that holds it,
even when the text after the prefix differs within the first characters that the older
rule (a rendezvous hash of the prompt's first 256 characters) would have routed by."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from maas.v1 import common_pb2, inference_pb2

from .conftest import MeshHarness, eventually

# about 200 characters: more than the 128 that make a prefix key, fewer than its 256, so each
# prompt's key includes its own question and the character rule would scatter them
SYSTEM = ("You are the release assistant of a small team. Answer in one short sentence, cite the "
          "changelog entry you used, and never invent version numbers that are not in it. Be kind. ")


def _routed() -> float:
    return REGISTRY.get_sample_value("maas_router_kv_routed_requests_total", {"model": "demo"}) or 0.0


async def test_prompts_sharing_a_cached_prefix_go_to_the_replica_that_holds_it(mesh: MeshHarness,
                                                                               demo_model_dir: Path):
    await mesh.core()
    await mesh.worker()
    await mesh.worker()
    await mesh.register("demo", fmt="hf", source=str(demo_model_dir))
    await mesh.deploy("demo", replicas=2)
    status = await mesh.wait_ready("demo", replicas=2, timeout=120)
    assert len({r.worker_id for r in status.replicas}) == 2
    pool = mesh.router_pool
    assert pool is not None and pool.kv is not None and pool.kv.enabled
    stub = await mesh.stub("router")

    async def ask(prompt: str) -> inference_pb2.GenerateResponse:
        return await stub.Generate(inference_pb2.GenerateRequest(  # type: ignore[attr-defined, no-any-return]
            model="demo", prompt=prompt, params=common_pb2.SamplingParams(max_tokens=2, temperature=0)), timeout=60)

    # the same prompt again and again (one replica, by its characters) until the router has
    # the tokenizer and routes it by the blocks that replica reported
    warm = SYSTEM + "Question 0: what changed in 1.2?"
    home = (await ask(warm)).replica_id
    before = _routed()

    async def routed_by_blocks() -> bool:
        assert (await ask(warm)).replica_id == home
        return _routed() > before

    await eventually(routed_by_blocks, timeout=60, interval=0.2)
    other = next(r.replica_id for r in status.replicas if r.replica_id != home)
    assert pool.kv.index.held(home) > 0 and pool.kv.index.held(other) == 0

    before = _routed()
    questions = [f"Question {i}: is {i} a release you shipped?" for i in range(1, 13)]
    served = []
    for q in questions:
        reply = await ask(SYSTEM + q)
        served.append(reply.replica_id)
        assert reply.usage.cached_prompt_tokens >= 16, f"{q!r} computed its whole prompt"
    assert served == [home] * len(questions), "a prompt sharing the cached prefix went elsewhere"
    assert _routed() - before == len(questions)
