"""The continuous-batching engine is exact: a request's tokens do not depend on what shares
its batch, and it matches `model.generate`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from maas.mesh.errors import InvalidArgument, ResourceExhausted
from maas.services.worker.engines import metrics
from maas.services.worker.engines.base import Delta, GenerationRequest, ModelSpec, SamplingParams
from maas.services.worker.engines.hf import HFEngine

PROMPTS = ["def add(a, b):", "import os\nimport sys\n\nclass Config(object):\n    def __init__(self, path",
           "x = [", "for key, value in sorted(items.items()):\n    if"]


@pytest.fixture
async def engine(demo_model_dir: Path) -> AsyncIterator[HFEngine]:
    e = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options={"max_batch": "8", "max_queue": "4"}))
    await e.load()
    yield e
    await e.close()


async def run(engine: HFEngine, prompt: str, request_id: str = "r", **params: object) -> tuple[list[int], list[Delta]]:
    deltas = [d async for d in engine.generate(GenerationRequest(request_id, prompt, SamplingParams(**params)))]  # type: ignore[arg-type]
    return [t for d in deltas for t in d.token_ids], deltas


def reference_greedy(model_dir: Path, prompt: str, n: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


async def test_greedy_matches_model_generate_alone_and_in_a_mixed_batch(engine: HFEngine, demo_model_dir: Path):
    expected = [reference_greedy(demo_model_dir, p, 24) for p in PROMPTS]
    alone = [(await run(engine, p, max_tokens=24, temperature=0, ignore_eos=True))[0] for p in PROMPTS]
    assert alone == expected
    # all at once, with different lengths: they share the batch and still agree token for token
    together = await asyncio.gather(*(run(engine, p, f"r{i}", max_tokens=24 - 4 * i, temperature=0, ignore_eos=True)
                                      for i, p in enumerate(PROMPTS)))
    assert [t for t, _ in together] == [e[:24 - 4 * i] for i, e in enumerate(expected)]


async def test_a_request_joining_a_running_batch_is_not_disturbed(engine: HFEngine, demo_model_dir: Path):
    expected = reference_greedy(demo_model_dir, PROMPTS[1], 40)
    long = asyncio.create_task(run(engine, PROMPTS[1], "long", max_tokens=40, temperature=0, ignore_eos=True))
    await asyncio.sleep(0.05)  # the long one is decoding when the others arrive and leave
    for i in range(3):
        await run(engine, PROMPTS[i % 2 * 2], f"short{i}", max_tokens=3, temperature=0)
    assert (await long)[0] == expected


async def test_seeded_sampling_is_the_same_alone_in_a_batch_and_resumed(engine: HFEngine):
    params = {"max_tokens": 20, "temperature": 0.9, "top_p": 0.95, "seed": 42, "ignore_eos": True}
    alone, _ = await run(engine, PROMPTS[0], **params)
    crowd = await asyncio.gather(run(engine, PROMPTS[0], "me", **params),
                                 *(run(engine, p, f"o{i}", max_tokens=15, temperature=1.0) for i, p in enumerate(PROMPTS)))
    assert crowd[0][0] == alone
    k = 7
    resumed = [d async for d in engine.generate(GenerationRequest(
        "resumed", PROMPTS[0], SamplingParams(**params), resume_token_ids=tuple(alone[:k])))]  # type: ignore[arg-type]
    assert [t for d in resumed for t in d.token_ids] == alone[k:]
    assert resumed[-1].completion_tokens == 20


async def test_cancelled_requests_free_their_slot_and_the_gauges_return(engine: HFEngine):
    label = "demo@1"

    def gauge(g: object) -> float:
        return g.labels(label)._value.get()  # type: ignore[attr-defined]

    streams = [engine.generate(GenerationRequest(f"c{i}", PROMPTS[i], SamplingParams(max_tokens=500, ignore_eos=True)))
               for i in range(3)]
    for s in streams:
        await anext(s)  # type: ignore[call-overload]
    assert gauge(metrics.RUNNING) == 3 and gauge(metrics.KV_USAGE) > 0
    for s in streams:
        await s.aclose()  # type: ignore[attr-defined]
    for _ in range(100):
        if gauge(metrics.RUNNING) == 0:
            break
        await asyncio.sleep(0.02)
    assert gauge(metrics.RUNNING) == 0 and gauge(metrics.KV_USAGE) == 0 and engine.stats().running == 0
    # (ignore_eos: a sampled token may be the end of text, which would finish it as "stop")
    assert (await run(engine, PROMPTS[0], max_tokens=2, ignore_eos=True))[1][-1].finish_reason == "length"


async def test_stop_strings_cut_exactly(engine: HFEngine):
    _, deltas = await run(engine, PROMPTS[0], max_tokens=40, temperature=0, ignore_eos=True)
    text = "".join(d.text for d in deltas)
    stop = text[10:13]
    _, stopped = await run(engine, PROMPTS[0], max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    assert "".join(d.text for d in stopped) == text[:text.index(stop)]
    assert stopped[-1].finish_reason == "stop"


async def test_admission_queue_and_limits(engine: HFEngine):
    with pytest.raises(InvalidArgument, match="context"):
        await run(engine, "x " * 2000)
    with pytest.raises(ResourceExhausted, match="KV-cache budget"):
        tiny = HFEngine(ModelSpec("demo", 1, "hf", engine.spec.source, options={"kv_cache_mb": "1"}))
        await tiny.load()
        try:
            await run(tiny, PROMPTS[0], max_tokens=1000)
        finally:
            await tiny.close()
    # 8 running + 4 queued fit; the 13th is refused at once with RESOURCE_EXHAUSTED
    def stream(i: int) -> AsyncIterator[Delta]:
        return engine.generate(GenerationRequest(f"q{i}", PROMPTS[0], SamplingParams(max_tokens=500, ignore_eos=True)))

    running = [stream(i) for i in range(8)]
    for s in running:
        await anext(s)  # type: ignore[call-overload]
    queued = [asyncio.ensure_future(anext(stream(8 + i))) for i in range(4)]  # type: ignore[call-overload]
    for _ in range(100):
        if engine.stats().waiting == 4:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="overloaded"):
        await anext(stream(12))  # type: ignore[call-overload]
    for s in running:
        await s.aclose()  # type: ignore[attr-defined]
    done = await asyncio.gather(*queued)  # slots freed: the queued ones are admitted and start
    assert all(d.token_ids for d in done)


async def test_logprobs_of_the_chosen_and_top_tokens(engine: HFEngine):
    ids, deltas = await run(engine, PROMPTS[0], max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    logprobs = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in logprobs] == ids
    for lp in logprobs:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy picks the most likely
        assert lp.logprob <= 0 and [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    _, plain = await run(engine, PROMPTS[0], max_tokens=4, temperature=0)
    assert all(not d.logprobs for d in plain)


async def test_closing_the_engine_fails_in_flight_requests_instead_of_hanging(demo_model_dir: Path):
    from maas.mesh.errors import Unavailable

    e = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options={"max_batch": "1"}))
    await e.load()
    running = e.generate(GenerationRequest("a", PROMPTS[0], SamplingParams(max_tokens=1000, ignore_eos=True)))
    await anext(running)  # type: ignore[call-overload]
    waiting = asyncio.ensure_future(anext(e.generate(  # type: ignore[call-overload]
        GenerationRequest("b", PROMPTS[1], SamplingParams(max_tokens=5)))))
    await asyncio.sleep(0.05)
    await e.close()
    with pytest.raises(Unavailable, match="shutting down"):
        async for _ in running:
            pass
    with pytest.raises(Unavailable):
        await asyncio.wait_for(waiting, 5)
    await e.load()  # and it can serve again after a reload
    assert (await run(e, PROMPTS[0], max_tokens=2))[1][-1].completion_tokens == 2
    await e.close()


async def test_cancelled_waiting_requests_free_their_queue_place(demo_model_dir: Path):
    e = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options={"max_batch": "1", "max_queue": "2"}))
    await e.load()
    try:
        busy = e.generate(GenerationRequest("busy", PROMPTS[0], SamplingParams(max_tokens=1000, ignore_eos=True)))
        await anext(busy)  # type: ignore[call-overload]
        queued = [asyncio.ensure_future(anext(e.generate(GenerationRequest(  # type: ignore[call-overload]
            f"q{i}", PROMPTS[1], SamplingParams(max_tokens=3))))) for i in range(2)]
        await asyncio.sleep(0.05)
        assert e.stats().waiting == 2
        for q in queued:
            q.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        assert e.stats().waiting == 0
        again = asyncio.ensure_future(anext(e.generate(GenerationRequest(  # type: ignore[call-overload]
            "again", PROMPTS[1], SamplingParams(max_tokens=3)))))
        await asyncio.sleep(0.05)
        assert not again.done() or not isinstance(again.exception(), ResourceExhausted)
        await busy.aclose()  # type: ignore[attr-defined]
        assert (await asyncio.wait_for(again, 10)).token_ids
    finally:
        await e.close()


async def test_resuming_with_every_token_produced_finishes_at_once(engine: HFEngine):
    ids, _ = await run(engine, PROMPTS[0], max_tokens=6, temperature=0, ignore_eos=True)
    deltas = [d async for d in engine.generate(GenerationRequest(
        "done", PROMPTS[0], SamplingParams(max_tokens=6, temperature=0), resume_token_ids=tuple(ids)))]
    assert len(deltas) == 1 and deltas[0].finish_reason == "length" and not deltas[0].token_ids
    assert deltas[0].completion_tokens == 6


async def test_a_vanishing_temperature_is_greedy_not_broken(engine: HFEngine):
    greedy, _ = await run(engine, PROMPTS[0], max_tokens=10, temperature=0, ignore_eos=True)
    tiny, _ = await run(engine, PROMPTS[0], max_tokens=10, temperature=1e-30, ignore_eos=True, seed=1)
    assert tiny == greedy


async def test_a_request_that_does_not_stream_gets_one_delta_with_everything(engine: HFEngine):
    streamed = [d async for d in engine.generate(GenerationRequest("s", PROMPTS[1], SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True, logprobs=2, stop=["never"])))]
    whole = [d async for d in engine.generate(GenerationRequest("w", PROMPTS[1], SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True, logprobs=2, stop=["never"]), stream=False))]
    assert len(streamed) > 1 and len(whole) == 1
    (one,) = whole
    assert one.token_ids == tuple(t for d in streamed for t in d.token_ids)
    assert one.text == "".join(d.text for d in streamed)
    expected = [lp for d in streamed for lp in d.logprobs]
    assert [lp.token_id for lp in one.logprobs] == [lp.token_id for lp in expected]
    assert [lp.logprob for lp in one.logprobs] == pytest.approx([lp.logprob for lp in expected], abs=1e-4)
    assert (one.finish_reason, one.completion_tokens, one.prompt_tokens) == \
        (streamed[-1].finish_reason, streamed[-1].completion_tokens, streamed[-1].prompt_tokens)
