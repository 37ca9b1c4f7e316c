"""min_tokens, min_p, stop_token_ids, prompt logprobs and token strings over gRPC, end to end:
a router and a worker serving the forged demo model (its engine in a process of its own)
and the sim model; a client's GenerateStream and Generate through the router."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from maas.v1 import common_pb2, inference_pb2

from .conftest import MeshHarness

PROMPT = "import os\nimport sys\n\n\ndef read(path):\n    with open(path) as f:\n"


@pytest.fixture
async def served(mesh: MeshHarness, demo_model_dir: Path) -> AsyncIterator[MeshHarness]:
    await mesh.core()
    await mesh.worker()
    await mesh.register("demo", fmt="hf", source=str(demo_model_dir))
    await mesh.register("echo")
    await mesh.deploy("demo")
    await mesh.deploy("echo")
    await mesh.wait_ready("demo", timeout=60)
    await mesh.wait_ready("echo")
    yield mesh


async def _stream(mesh: MeshHarness, model: str, prompt: str, **params: object) -> list[inference_pb2.GenerateChunk]:
    return await mesh.generate(model, prompt, **params)


async def _unary(mesh: MeshHarness, model: str, prompt: str, **params: object) -> inference_pb2.GenerateResponse:
    stub = await mesh.stub("router")
    request = inference_pb2.GenerateRequest(model=model, prompt=prompt,
                                            params=common_pb2.SamplingParams(**params))  # type: ignore[arg-type]
    return await stub.Generate(request, timeout=30)  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize("model", ["demo", "echo"])
async def test_prompt_logprobs_and_token_strings_reach_a_grpc_client_once(served: MeshHarness, model: str) -> None:
    chunks = await _stream(served, model, PROMPT, max_tokens=6, temperature=0, ignore_eos=True, logprobs=1,
                           prompt_logprobs=2)
    first = chunks[0]
    assert all(not c.prompt_token_ids and not c.prompt_logprobs for c in chunks[1:])
    assert len(first.prompt_token_ids) == len(first.prompt_logprobs) > 5
    assert [p.token_id for p in first.prompt_logprobs] == list(first.prompt_token_ids)
    assert not first.prompt_logprobs[0].top and all(len(p.top) == 2 for p in first.prompt_logprobs[1:])
    assert all(p.logprob <= 0 and p.top[0].token for p in first.prompt_logprobs[1:])
    assert "".join(p.token for p in first.prompt_logprobs[1:]).strip() in PROMPT
    output = [lp for c in chunks for lp in c.logprobs]
    assert "".join(lp.token for lp in output) == "".join(c.text for c in chunks)
    unary = await _unary(served, model, PROMPT, max_tokens=6, temperature=0, ignore_eos=True, logprobs=1,
                         prompt_logprobs=2)
    assert list(unary.prompt_token_ids) == list(first.prompt_token_ids)
    assert [(p.token, p.logprob) for p in unary.prompt_logprobs] == [(p.token, p.logprob) for p in first.prompt_logprobs]
    assert unary.text == "".join(c.text for c in chunks)


@pytest.mark.parametrize("model", ["demo", "echo"])
async def test_stop_token_ids_min_tokens_and_min_p_over_grpc(served: MeshHarness, model: str) -> None:
    plain = await _unary(served, model, PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
    stop = plain.token_ids[3]
    cut = list(plain.token_ids).index(stop)
    stopped = await _unary(served, model, PROMPT, max_tokens=12, temperature=0, stop_token_ids=[stop])
    assert stopped.finish_reason == common_pb2.FINISH_REASON_STOP
    assert list(stopped.token_ids) == list(plain.token_ids[:cut + 1])
    late = await _unary(served, model, PROMPT, max_tokens=12, temperature=0, stop_token_ids=[stop], min_tokens=8)
    assert stop not in late.token_ids[:8] and len(late.token_ids) > 8
    sampled = await _unary(served, model, PROMPT, max_tokens=12, temperature=1.0, seed=4, min_p=1.0, ignore_eos=True)
    assert list(sampled.token_ids) == list(plain.token_ids)


BAD = [({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
       ({"min_p": 1.5}, "min_p"), ({"stop_token_ids": [100_000]}, "stop_token_ids"),
       ({"prompt_logprobs": 21}, "prompt_logprobs")]


async def test_bad_values_are_invalid_argument_naming_the_field(served: MeshHarness) -> None:
    for model in ("demo", "echo"):
        for params, field in BAD:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await _unary(served, model, PROMPT, **params)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
            assert ("maas-field", field) in tuple(failed.value.trailing_metadata() or ()), (model, params)
