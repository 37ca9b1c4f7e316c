"""The transformers engine in a process of its own answers exactly as it does in process,
and its failures reach the worker as the same errors."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from maas.mesh.errors import EngineDead, InvalidArgument, ResourceExhausted, Unavailable
from maas.services.worker.engines import create_engine
from maas.services.worker.engines.base import ChatMessage, Delta, GenerationRequest, ModelSpec, SamplingParams
from maas.services.worker.engines.hf import HFEngine
from maas.services.worker.engines.process import ProcessEngine

PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "x = [", "for key, value in items:"]


@pytest.fixture(scope="module")
def spec(demo_model_dir: Path) -> ModelSpec:
    return ModelSpec("procdemo", 1, "hf", str(demo_model_dir), options={"max_batch": "4", "max_queue": "2"})


@pytest.fixture
async def engine(spec: ModelSpec) -> AsyncIterator[ProcessEngine]:
    e = create_engine(spec)
    assert isinstance(e, ProcessEngine)
    await e.load()
    yield e
    await e.close()


async def run(engine: object, prompt: str, **params: object) -> list[Delta]:
    request = GenerationRequest("r", prompt, SamplingParams(**params))  # type: ignore[arg-type]
    return [d async for d in engine.generate(request)]  # type: ignore[attr-defined]


def tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def test_same_tokens_text_and_usage_as_in_process(engine: ProcessEngine, spec: ModelSpec) -> None:
    local = HFEngine(spec)
    await local.load()
    try:
        for params in ({"max_tokens": 12, "temperature": 0.0},
                       {"max_tokens": 12, "temperature": 0.9, "seed": 7, "logprobs": 2},
                       {"max_tokens": 12, "temperature": 0.0, "stop": ("\n",)}):
            ours = await asyncio.gather(*(run(engine, p, **params) for p in PROMPTS))
            theirs = [await run(local, p, **params) for p in PROMPTS]
            for a, b in zip(ours, theirs, strict=True):
                assert tokens(a) == tokens(b)
                assert "".join(d.text for d in a) == "".join(d.text for d in b)
                assert (a[-1].finish_reason, a[-1].completion_tokens, a[-1].prompt_tokens) == \
                    (b[-1].finish_reason, b[-1].completion_tokens, b[-1].prompt_tokens)
                assert [lp.token_id for d in a for lp in d.logprobs] == [lp.token_id for d in b for lp in d.logprobs]
        # a resumed stream continues with the uninterrupted run's tokens
        full = tokens(await run(engine, PROMPTS[0], max_tokens=10, temperature=0.8, seed=3))
        resumed = [d async for d in engine.generate(GenerationRequest(
            "r2", PROMPTS[0], SamplingParams(max_tokens=10, temperature=0.8, seed=3), resume_token_ids=tuple(full[:4])))]
        assert full[:4] + tokens(resumed) == full
        chat = [ChatMessage("user", "hello")]
        assert engine.render_chat(chat) == local.render_chat(chat)
    finally:
        await local.close()


async def test_errors_cross_with_their_type_and_field(engine: ProcessEngine) -> None:
    with pytest.raises(InvalidArgument) as bad:
        await run(engine, "hi", max_tokens=10**6)
    assert bad.value.field == "max_tokens"
    with pytest.raises(InvalidArgument, match="resume_token_ids"):
        [d async for d in engine.generate(GenerationRequest("r", "hi", resume_token_ids=(10**7,)))]
    # more than the batch (4) plus the queue (2) at once: the rest are refused, the others finish
    results = await asyncio.gather(*(run(engine, "x", max_tokens=40, temperature=0, ignore_eos=True)
                                     for _ in range(10)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert refused and all(isinstance(r, list) and r[-1].completion_tokens == 40
                           for r in results if not isinstance(r, BaseException))


async def test_closing_a_stream_frees_its_slot(engine: ProcessEngine) -> None:
    for _ in range(6):  # more than max_batch + max_queue: only possible if the abandoned ones left
        stream = engine.generate(GenerationRequest("r", "x", SamplingParams(max_tokens=500, ignore_eos=True)))
        await anext(stream)  # type: ignore[call-overload]
        await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(2 * 0.5)  # two status reports
    assert engine.stats().running == 0
    assert (await run(engine, "y", max_tokens=3))[-1].completion_tokens == 3
    exposed = generate_latest(REGISTRY).decode()
    assert 'maas_engine_requests_total{finish_reason="cancelled",model="procdemo@1"}' in exposed


async def test_a_killed_engine_process_fails_its_streams_and_later_requests(engine: ProcessEngine) -> None:
    stream = engine.generate(GenerationRequest("r", "x", SamplingParams(max_tokens=500, ignore_eos=True)))
    await anext(stream)  # type: ignore[call-overload]
    assert engine._process is not None
    engine._process.kill()
    with pytest.raises(EngineDead, match="exited"):
        async for _ in stream:  # type: ignore[attr-defined]
            pass
    with pytest.raises(EngineDead):
        await run(engine, "y", max_tokens=2)
    assert engine.stats().running == 0


async def test_close_ends_open_streams_and_the_process(spec: ModelSpec) -> None:
    engine = create_engine(spec)
    await engine.load()
    stream = engine.generate(GenerationRequest("r", "x", SamplingParams(max_tokens=900, ignore_eos=True)))
    await anext(stream)  # type: ignore[call-overload]
    process = engine._process  # type: ignore[attr-defined]
    await engine.close()
    assert process.poll() is not None
    with pytest.raises(Unavailable):
        async for _ in stream:  # type: ignore[attr-defined]
            pass
    with pytest.raises(Unavailable):
        await run(engine, "y", max_tokens=2)


async def test_a_model_that_cannot_load_fails_load_and_leaves_no_process(tmp_path: Path) -> None:
    engine = create_engine(ModelSpec("broken", 1, "hf", str(tmp_path)))
    with pytest.raises(EngineDead, match="cannot load model broken"):
        await engine.load()
    assert engine._process is None  # type: ignore[attr-defined]


async def test_a_stream_interval_sends_the_same_tokens_in_fewer_messages(spec: ModelSpec) -> None:
    interval = 0.15
    paced = dataclasses.replace(spec, name="paced", options={**spec.options, "stream_interval_ms": "150"})
    reference = HFEngine(spec)
    engines = [reference, create_engine(paced), HFEngine(paced)]  # unpaced; paced in its own process and in process
    for e in engines:
        await e.load()
    try:
        want = tokens(await run(reference, PROMPTS[0], max_tokens=32, temperature=0.0, ignore_eos=True))
        for e in engines[1:]:
            started = time.monotonic()
            got = await run(e, PROMPTS[0], max_tokens=32, temperature=0.0, ignore_eos=True)
            took = time.monotonic() - started
            assert tokens(got) == want and got[-1].finish_reason == "length"
            # after the first, at most one message per interval (and the last, sent at once)
            assert len(got) <= took / interval + 2, (len(got), took)
    finally:
        for e in engines:
            await e.close()
