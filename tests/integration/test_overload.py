"""Overload stays graceful: with four times more concurrent streams than the engine has
batch slots, the engine's short queue is filled, the rest are refused at once with a retry
hint (before any admitted stream ends, so not after waiting), and every admitted stream
completes in full. Nothing is timed: the order of events is what is checked."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import grpc
import pytest

from maas.v1 import common_pb2, inference_pb2

from .conftest import MeshHarness

SLOTS, QUEUE, TOKENS = 2, 2, 48


async def test_four_times_the_slots_fills_the_queue_and_refuses_the_rest_at_once(
        mesh: MeshHarness, demo_model_dir: Path) -> None:
    await mesh.registry()
    await mesh.scheduler()
    router = await mesh.router(http_port=0)
    await mesh.worker()
    await mesh.register("demo", fmt="hf", source=str(demo_model_dir), max_batch=str(SLOTS), max_queue=str(QUEUE))
    await mesh.deploy("demo")
    await mesh.wait_ready("demo", timeout=90)
    stub = await mesh.stub("router")

    async def stream(i: int) -> tuple[str, float, float, grpc.aio.AioRpcError | None]:
        """(what happened, when it ended, when its first token came) for one stream."""
        request = inference_pb2.GenerateRequest(model="demo", prompt=f"def f{i}(x):", params=common_pb2.SamplingParams(
            max_tokens=TOKENS, temperature=0, ignore_eos=True))
        first = 0.0
        try:
            chunks = []
            async for chunk in stub.GenerateStream(request, timeout=60):  # type: ignore[attr-defined]
                first = first or time.monotonic()
                chunks.append(chunk)
            assert sum(len(c.token_ids) for c in chunks) == TOKENS
            return "done", time.monotonic(), first, None
        except grpc.aio.AioRpcError as e:
            return "refused", time.monotonic(), first, e

    results = await asyncio.gather(*(stream(i) for i in range(4 * SLOTS)))
    done = [r for r in results if r[0] == "done"]
    refused = [r for r in results if r[0] == "refused"]
    assert len(done) >= SLOTS + QUEUE and refused, [r[0] for r in results]
    first_end = min(r[1] for r in done)
    for _, ended, first, error in refused:
        assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "at capacity" in (error.details() or "")
        assert int(dict(error.trailing_metadata() or ()).get("retry-after", "0")) >= 1
        assert first == 0.0 and ended < first_end  # refused while the admitted ones still ran

    # the OpenAI HTTP API answers the same case with 429 and Retry-After
    url = f"http://{router.info.http_endpoint}/v1/completions"
    headers = {"Authorization": f"Bearer {mesh.admin_token}"}
    body = {"model": "demo", "prompt": "x = ", "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}

    async def post(http: aiohttp.ClientSession) -> tuple[int, str, dict[str, object]]:
        async with http.post(url, json=body, headers=headers) as resp:
            return resp.status, resp.headers.get("retry-after", ""), await resp.json()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        replies = await asyncio.gather(*(post(http) for _ in range(4 * SLOTS)))
    codes = sorted(status for status, _, _ in replies)
    assert codes.count(200) >= SLOTS + QUEUE and 429 in codes, codes
    _, retry_after, error = next(r for r in replies if r[0] == 429)
    assert int(retry_after) >= 1
    assert error["error"]["type"] == "rate_limit_error"  # type: ignore[index]

    # a request too big for a replica's KV budget is refused with that reason, not as "at
    # capacity, retry": retrying would never help
    await mesh.register("tinykv", fmt="hf", source=str(demo_model_dir), kv_cache_mb="1")
    await mesh.deploy("tinykv")
    await mesh.wait_ready("tinykv", timeout=90)
    request = inference_pb2.GenerateRequest(model="tinykv", prompt="x", params=common_pb2.SamplingParams(
        max_tokens=600, ignore_eos=True))
    with pytest.raises(grpc.aio.AioRpcError) as too_big:
        [c async for c in stub.GenerateStream(request, timeout=60)]  # type: ignore[attr-defined]
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV-cache budget" in (too_big.value.details() or "") and "at capacity" not in (too_big.value.details() or "")
    assert "retry-after" not in dict(too_big.value.trailing_metadata() or ())
