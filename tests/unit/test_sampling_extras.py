"""min_tokens, min_p, stop_token_ids, prompt logprobs and token strings (issue 15, item 3):
the sampler's rules alone, then the hf engine on the forged demo model, the sim engine, and
the protobuf conversion the worker's Generate and GenerateStream use."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from maas.mesh.errors import InvalidArgument
from maas.services.worker.convert import chunk_from_delta, sampling_from_proto
from maas.services.worker.engines import create_engine, metrics
from maas.services.worker.engines.base import (
    Delta,
    Engine,
    GenerationRequest,
    ModelSpec,
    SamplingParams,
    merge,
)
from maas.services.worker.engines.hf import HFEngine
from maas.services.worker.engines.sampling import Row, filter_logits, sample_batch
from maas.services.worker.engines.sim import FAVOURITE, OTHER, WORDS
from maas.services.worker.engines.text import DeltaAssembler, StopMatcher, token_string
from maas.v1 import common_pb2

PROMPT = "def add(a, b):"
# 40-odd tokens: two 16-token blocks of it go into the prefix cache
LONG_PROMPT = "import os\nimport sys\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n"


async def _run(engine: Engine, prompt: str = PROMPT, resume: tuple[int, ...] = (), *, stream: bool = True,
               **params: object) -> list[Delta]:
    request = GenerationRequest("r", prompt, SamplingParams(**params), resume_token_ids=resume,  # type: ignore[arg-type]
                                stream=stream)
    return [d async for d in engine.generate(request)]


async def _collect(engine: Engine, request: GenerationRequest) -> list[Delta]:
    return [d async for d in engine.generate(request)]


def _whole(deltas: list[Delta]) -> Delta:
    out = deltas[0]
    for d in deltas[1:]:
        out = merge(out, d)
    return out


def _text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def _tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


# --- the sampler and the text helpers, without a model -------------------------------------


def test_min_p_keeps_the_tokens_within_its_share_of_the_most_likely() -> None:
    probs = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03])
    logits = probs.log()
    kept = torch.isfinite(filter_logits(logits, SamplingParams(min_p=0.2))).tolist()
    assert kept == [True, True, True, False, False]  # 0.12 >= 0.2 * 0.5 > 0.05
    kept = torch.isfinite(filter_logits(logits, SamplingParams(min_p=0.3, temperature=2.0))).tolist()
    assert kept == [True, True, True, True, False]  # after temperature: sqrt(0.05 / 0.5) >= 0.3 > sqrt(0.03 / 0.5)
    assert torch.isfinite(filter_logits(logits, SamplingParams(min_p=0.0))).all()


def test_min_p_one_draws_the_most_likely_token_whatever_the_seed() -> None:
    for s in range(5):
        logits = torch.randn(200, generator=torch.Generator().manual_seed(s))
        rows = [Row(SamplingParams(temperature=1.5, min_p=1.0), seed, [0] * 7, []) for seed in range(20)]
        assert set(sample_batch(logits.expand(20, -1), rows)) == {int(torch.argmax(logits))}


def test_end_tokens_are_masked_until_min_tokens() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 3] = 10.0  # end token 3 is by far the most likely
    logits[:, 5] = 5.0
    params = SamplingParams(temperature=0, min_tokens=4)
    short = Row(params, 0, [1], [7, 7, 7], end_ids=(3,))
    done = Row(params, 0, [1], [7, 7, 7, 7], end_ids=(3,))
    assert sample_batch(logits, [short, done]) == [5, 3]
    assert logits[0, 3] == 10.0  # the caller's logits stay the model's (logprobs come from them)


def test_a_grammar_that_allows_only_the_end_wins_over_min_tokens() -> None:
    logits = torch.full((1, 10), float("-inf"))
    logits[0, 3] = 0.0  # what a complete grammar leaves: end-of-sequence alone
    row = Row(SamplingParams(temperature=0, min_tokens=4), 0, [1], [], end_ids=(3,))
    assert sample_batch(logits, [row]) == [3]


def test_rows_draw_the_same_token_alone_and_in_any_batch_with_the_new_parameters() -> None:
    vocab = 300
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0)) * 2
    rows = [Row(SamplingParams(temperature=1.0, min_p=0.05), 1, [0] * 4, [9]),
            Row(SamplingParams(temperature=0.8, min_p=0.2, top_k=20), 2, [0] * 9, []),
            Row(SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=(5,)), 3, [0] * 2, [1], end_ids=(1, 5)),
            Row(SamplingParams(temperature=0), 4, [0], []),
            Row(SamplingParams(temperature=1.2, top_p=0.9, min_p=0.01), 5, [0] * 3, [4, 4]),
            Row(SamplingParams(temperature=1.0), 6, [0] * 5, [])]
    together = sample_batch(logits, rows)
    alone = [sample_batch(logits[i:i + 1], [row])[0] for i, row in enumerate(rows)]
    reversed_batch = sample_batch(logits.flip(0), rows[::-1])[::-1]
    assert together == alone == reversed_batch
    assert together[2] not in (1, 5)


def test_stop_strings_count_only_after_min_tokens_as_in_vllm() -> None:
    """vLLM's own case (tests/detokenizer/test_min_tokens.py): a stop string in the text of
    the first min_tokens tokens is ignored; one that ends in a later token's text stops."""
    pieces = [" is", " Lee", ",", " and", " I", "'m", " a", " student", " in", " the"]

    def run(min_tokens: int, stop: str) -> str:
        out = DeltaAssembler([stop], prompt_tokens=4, min_tokens=min_tokens)
        for i, piece in enumerate(pieces):
            out.add(i, piece)
            if out.stopped:
                break
        return out.finish("length").text

    assert run(0, "e") == " is L"
    assert run(5, "e") == " is Lee, and I'm a stud"
    assert run(10, "e") == "".join(pieces)  # never reached: min_tokens = every token made


def test_a_stop_string_that_begins_before_min_tokens_and_ends_after_it_stops() -> None:
    matcher = StopMatcher(["ab", "b"])
    assert matcher.feed("xa", check=False) == ("x", False)  # "a" held: it may begin "ab"
    assert matcher.feed("b") == ("", True)                  # "ab" ends in checked text: cut at its start
    matcher = StopMatcher(["b", "abc"])
    assert matcher.feed("ab", check=False) == ("", False)  # "b" is whole in unchecked text: ignored
    assert matcher.feed("x") == ("abx", False)


def test_token_strings_of_pieces_of_a_character_are_their_bytes() -> None:
    assert token_string(b" add") == " add"
    assert token_string("é".encode()) == "é"
    assert token_string(b"\xc3") == "bytes:\\xc3"
    assert token_string(b"\xe2\x82") == "bytes:\\xe2\\x82"


@pytest.mark.parametrize(("params", "field"), [
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"stop_token_ids": (3, -1)}, "stop_token_ids"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_bad_values_name_their_field(params: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        SamplingParams(**params)  # type: ignore[arg-type]
    assert caught.value.field == field
    SamplingParams(min_tokens=16, max_tokens=16, min_p=1.0, prompt_logprobs=20, stop_token_ids=(0,))  # the edges are fine


def test_the_new_fields_cross_protobuf() -> None:
    proto = common_pb2.SamplingParams(max_tokens=9, min_tokens=4, min_p=0.25, stop_token_ids=[7, 8], prompt_logprobs=0)
    params = sampling_from_proto(proto)
    assert (params.min_tokens, params.min_p, params.stop_token_ids, params.prompt_logprobs) == (4, 0.25, (7, 8), 0)
    plain = sampling_from_proto(common_pb2.SamplingParams())
    assert (plain.min_tokens, plain.min_p, plain.stop_token_ids, plain.prompt_logprobs) == (0, 0.0, (), None)
    with pytest.raises(InvalidArgument) as caught:
        sampling_from_proto(common_pb2.SamplingParams(prompt_logprobs=30))
    assert caught.value.field == "prompt_logprobs"

    from maas.services.worker.engines.base import TokenLogprob

    delta = Delta("x", (5,), logprobs=(TokenLogprob(5, -0.5, ((5, -0.5), (6, -1.0)), " x", (" x", " y")),),
                  prompt_token_ids=(1, 2),
                  prompt_logprobs=(TokenLogprob(1, 0.0, token="<s>"), TokenLogprob(2, -2.0, ((3, -1.0),), "a", ("b",))))
    chunk = chunk_from_delta(delta, request_id="r", model="m@1", replica_id="w")
    assert [(t.token_id, t.token, t.logprob) for t in chunk.logprobs[0].top] == [(5, " x", -0.5), (6, " y", -1.0)]
    assert chunk.logprobs[0].token == " x"
    assert list(chunk.prompt_token_ids) == [1, 2]
    assert [(p.token_id, p.token, p.logprob, len(p.top)) for p in chunk.prompt_logprobs] == [(1, "<s>", 0.0, 0),
                                                                                            (2, "a", -2.0, 1)]
    assert chunk.prompt_logprobs[1].top[0].token == "b"
    later = chunk_from_delta(Delta("y", (6,)), request_id="r", model="m@1", replica_id="w")
    assert not later.prompt_token_ids and not later.prompt_logprobs
    assert merge(delta, Delta("y", (6,))).prompt_token_ids == (1, 2)  # a lagging reader's merge keeps them


def test_the_worker_servicer_carries_the_prompt_fields_in_merged_chunks() -> None:
    from maas.services.worker.service import merge_chunks
    from maas.v1 import inference_pb2

    first = inference_pb2.GenerateChunk(text="a", token_ids=[1], prompt_token_ids=[4, 5],
                                        prompt_logprobs=[common_pb2.TokenLogprob(token_id=4),
                                                         common_pb2.TokenLogprob(token_id=5, logprob=-1.0)])
    merged = merge_chunks([first, inference_pb2.GenerateChunk(text="b", token_ids=[2])])
    assert list(merged.prompt_token_ids) == [4, 5] and len(merged.prompt_logprobs) == 2


# --- the transformers engine on the demo model ----------------------------------------------


@pytest.fixture
async def hf(demo_model_dir: Path) -> AsyncIterator[HFEngine]:
    engine = create_engine(ModelSpec("demo", 1, "hf", str(demo_model_dir)), own_process=False)
    assert isinstance(engine, HFEngine)  # tests look inside
    await engine.load()
    yield engine
    await engine.close()


def _reference_logprobs(engine: HFEngine, prompt: str) -> tuple[list[int], torch.Tensor]:
    """The prompt's ids and log_softmax of a plain full forward pass of the model over it."""
    ids = list(engine._tokenizer(prompt)["input_ids"])
    with torch.inference_mode():
        logits = engine._model(input_ids=torch.tensor([ids])).logits[0]
    return ids, torch.log_softmax(logits.float(), dim=-1)


def _check_prompt_logprobs(engine: HFEngine, prompt: str, deltas: list[Delta], top_n: int) -> None:
    ids, reference = _reference_logprobs(engine, prompt)
    with_prompt = [d for d in deltas if d.prompt_token_ids]
    assert len(with_prompt) == 1 and with_prompt[0] is deltas[0]  # once, on the first delta
    first = deltas[0]
    assert list(first.prompt_token_ids) == ids and len(first.prompt_logprobs) == len(ids)
    head = first.prompt_logprobs[0]
    assert (head.token_id, head.logprob, head.top) == (ids[0], 0.0, ())  # nothing precedes the first token
    for j, entry in enumerate(first.prompt_logprobs[1:], start=1):
        assert entry.token_id == ids[j]
        assert entry.logprob == pytest.approx(float(reference[j - 1, ids[j]]), abs=1e-4)
        top = torch.topk(reference[j - 1], top_n)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert len(entry.top_tokens) == top_n
    tokenizer = engine._tokenizer
    assert "".join(e.token for e in first.prompt_logprobs[1:]) == tokenizer.decode(ids[1:])  # the BOS aside
    assert "".join(e.token for e in first.prompt_logprobs[1:]) == prompt
    assert head.token == tokenizer.decode(ids[:1])


async def test_hf_stop_token_id_ends_the_output_right_before_it(hf: HFEngine) -> None:
    plain = await _run(hf, max_tokens=20, temperature=0, ignore_eos=True)
    tokens = _tokens(plain)
    stop = tokens[4]
    cut = tokens.index(stop)
    stopped = await _run(hf, max_tokens=20, temperature=0, stop_token_ids=(stop,))
    assert stopped[-1].finish_reason == "stop"
    assert _tokens(stopped) == tokens[:cut + 1]  # the stop token is in token_ids ...
    assert _text(stopped) == hf._tokenizer.decode(tokens[:cut])  # ... but not in the text, like EOS
    assert stopped[-1].completion_tokens == cut + 1


async def test_hf_min_tokens_keeps_going_past_stop_tokens_and_eos(hf: HFEngine) -> None:
    tokens = _tokens(await _run(hf, max_tokens=30, temperature=0, ignore_eos=True))
    stop = tokens[2]
    cut = tokens.index(stop)
    assert cut < 10
    early = await _run(hf, max_tokens=30, temperature=0, stop_token_ids=(stop,))
    assert len(_tokens(early)) == cut + 1
    late = await _run(hf, max_tokens=30, temperature=0, stop_token_ids=(stop,), min_tokens=12)
    made = _tokens(late)
    assert stop not in made[:12] and len(made) > 12
    assert made[:cut] == tokens[:cut]  # the same output up to where the stop token was masked
    assert late[-1].finish_reason == ("stop" if made[-1] == stop else "length")
    # an end-of-sequence token as well: make the same token the model's EOS
    hf._eos_ids = frozenset({*hf._eos_ids, stop})
    assert len(_tokens(await _run(hf, max_tokens=30, temperature=0))) == cut + 1
    made = _tokens(await _run(hf, max_tokens=30, temperature=0, min_tokens=12))
    assert stop not in made[:12] and len(made) > 12
    ignoring = _tokens(await _run(hf, max_tokens=30, temperature=0, min_tokens=12, ignore_eos=True))
    assert ignoring == tokens  # ignore_eos: EOS is no end token, so min_tokens masks nothing


async def test_hf_min_tokens_holds_stop_strings_back(hf: HFEngine) -> None:
    text = _text(await _run(hf, max_tokens=24, temperature=0, ignore_eos=True))
    stop = text[1:4]
    early = await _run(hf, max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,))
    assert _text(early) == text[:1] and early[-1].finish_reason == "stop"
    late = await _run(hf, max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,), min_tokens=24)
    assert _text(late) == text and late[-1].finish_reason == "length"


async def test_hf_min_p_one_decodes_greedily(hf: HFEngine) -> None:
    greedy = _tokens(await _run(hf, max_tokens=24, temperature=0, ignore_eos=True))
    for seed in (1, 2, 3):
        assert _tokens(await _run(hf, max_tokens=24, temperature=1.0, seed=seed, min_p=1.0, ignore_eos=True)) == greedy
    assert _tokens(await _run(hf, max_tokens=24, temperature=1.0, seed=1, ignore_eos=True)) != greedy


async def test_hf_prompt_logprobs_are_the_model_s_log_softmax_over_the_prompt(hf: HFEngine) -> None:
    deltas = await _run(hf, LONG_PROMPT, max_tokens=3, temperature=0, prompt_logprobs=3)
    _check_prompt_logprobs(hf, LONG_PROMPT, deltas, 3)
    assert not (await _run(hf, LONG_PROMPT, max_tokens=3, temperature=0))[0].prompt_logprobs  # only when asked
    zero = (await _run(hf, PROMPT, max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    assert all(not e.top for e in zero.prompt_logprobs) and len(zero.prompt_logprobs) == len(zero.prompt_token_ids)
    unary = await _run(hf, LONG_PROMPT, max_tokens=5, temperature=0, prompt_logprobs=3, stream=False)
    assert len(unary) == 1
    _check_prompt_logprobs(hf, LONG_PROMPT, unary, 3)


async def test_hf_prompt_logprobs_of_a_cached_prefix_are_computed_again(hf: HFEngine) -> None:
    cold = await _run(hf, LONG_PROMPT, max_tokens=4, temperature=0, prompt_logprobs=2)
    warm_plain = await _run(hf, LONG_PROMPT, max_tokens=4, temperature=0)
    assert warm_plain[-1].cached_prompt_tokens >= 16  # the prefix is cached now
    warm = await _run(hf, LONG_PROMPT, max_tokens=4, temperature=0, prompt_logprobs=2)
    assert warm[0].prompt_logprobs == cold[0].prompt_logprobs and warm[0].prompt_token_ids == cold[0].prompt_token_ids
    assert warm[-1].cached_prompt_tokens == 0  # it bypassed the cache
    assert _tokens(warm) == _tokens(cold) == _tokens(warm_plain)
    _check_prompt_logprobs(hf, LONG_PROMPT, warm, 2)


async def test_hf_prompt_logprobs_in_a_batch_leave_the_other_rows_unchanged(hf: HFEngine) -> None:
    prompts = [PROMPT, LONG_PROMPT, "x = 1\n", "class A:\n    def f(self):\n"]
    alone = [_tokens(await _run(hf, p, max_tokens=10, temperature=0, ignore_eos=True)) for p in prompts]
    runs = await asyncio.gather(*(_run(hf, p, max_tokens=10, temperature=0, ignore_eos=True,
                                       prompt_logprobs=1 if i % 2 else None) for i, p in enumerate(prompts)))
    assert [_tokens(d) for d in runs] == alone
    for i, (prompt, deltas) in enumerate(zip(prompts, runs, strict=True)):
        if i % 2:
            _check_prompt_logprobs(hf, prompt, deltas, 1)
        else:
            assert not any(d.prompt_logprobs for d in deltas)


async def test_hf_a_resumed_request_does_not_send_prompt_logprobs_again(hf: HFEngine) -> None:
    full = await _run(hf, max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=1)
    rest = await _run(hf, PROMPT, tuple(_tokens(full)[:4]), max_tokens=10, temperature=0, ignore_eos=True,
                      prompt_logprobs=1)
    assert _tokens(rest) == _tokens(full)[4:]
    assert not any(d.prompt_logprobs or d.prompt_token_ids for d in rest)


async def test_hf_a_preempted_request_sends_prompt_logprobs_once(demo_model_dir: Path) -> None:
    engine = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options={"max_batch": "1"}))
    await engine.load()
    try:
        params = SamplingParams(max_tokens=40, ignore_eos=True, seed=5, prompt_logprobs=2)
        alone = await _run(engine, LONG_PROMPT, max_tokens=40, ignore_eos=True, seed=5, prompt_logprobs=2)
        before = metrics.PREEMPTIONS.labels("demo@1")._value.get()
        got: list[Delta] = []
        running = asyncio.Event()

        async def batch() -> None:
            async for d in engine.generate(GenerationRequest("b", LONG_PROMPT, params, priority=2)):
                got.append(d)
                if len(_tokens(got)) >= 5:
                    running.set()

        task = asyncio.create_task(batch())
        await asyncio.wait_for(running.wait(), 30)
        online = await asyncio.wait_for(
            _collect(engine, GenerationRequest("o", PROMPT, SamplingParams(max_tokens=4), priority=0)), 30)
        await task
        assert online[-1].completion_tokens == 4
        assert metrics.PREEMPTIONS.labels("demo@1")._value.get() > before
        assert _tokens(got) == _tokens(alone)
        assert sum(1 for d in got if d.prompt_logprobs) == 1 and got[0].prompt_logprobs == alone[0].prompt_logprobs
    finally:
        await engine.close()


async def test_hf_output_token_strings_join_to_the_text(hf: HFEngine) -> None:
    deltas = await _run(hf, max_tokens=24, temperature=0.8, seed=4, ignore_eos=True, logprobs=2)
    logprobs = [lp for d in deltas for lp in d.logprobs]
    assert "".join(lp.token for lp in logprobs) == _text(deltas)
    tokenizer = hf._tokenizer
    for lp in logprobs:
        assert lp.token == tokenizer.decode([lp.token_id])
        assert list(lp.top_tokens) == [tokenizer.decode([t]) for t, _ in lp.top]
    pieces = hf._strings
    assert pieces is not None
    e_acute = tokenizer("é", add_special_tokens=False)["input_ids"]  # byte-level BPE: two one-byte pieces
    assert [pieces(t) for t in e_acute] == ["bytes:\\xc3", "bytes:\\xa9"]


async def test_hf_refuses_stop_token_ids_outside_the_vocabulary(hf: HFEngine) -> None:
    with pytest.raises(InvalidArgument, match="outside the vocabulary") as caught:
        await _run(hf, stop_token_ids=(1, 5000))
    assert caught.value.field == "stop_token_ids"


async def test_the_engine_process_answers_the_new_parameters_as_in_process(hf: HFEngine,
                                                                             demo_model_dir: Path) -> None:
    from maas.services.worker.engines.process import ProcessEngine

    engine = create_engine(ModelSpec("procextras", 1, "hf", str(demo_model_dir)))
    assert isinstance(engine, ProcessEngine)
    await engine.load()
    try:
        stop = _tokens(await _run(hf, max_tokens=8, temperature=0, ignore_eos=True))[3]
        params = {"max_tokens": 16, "temperature": 0.9, "seed": 2, "logprobs": 2, "prompt_logprobs": 2,
                  "min_p": 0.05, "min_tokens": 6, "stop_token_ids": (stop,)}
        ours, theirs = await _run(engine, LONG_PROMPT, **params), await _run(hf, LONG_PROMPT, **params)
        assert _whole(ours) == _whole(theirs)  # (deltas that piled up in the pipe may come merged)
        assert ours[0].prompt_logprobs and ours[0].prompt_logprobs == theirs[0].prompt_logprobs
    finally:
        await engine.close()


# --- the simulator ------------------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[Engine]:
    engine = create_engine(ModelSpec("sim", 1, "sim", "", options={"token_delay_ms": "0", "context_length": "64"}))
    await engine.load()
    yield engine
    await engine.close()


async def test_sim_stop_token_ids_and_min_tokens(sim: Engine) -> None:
    tokens = _tokens(await _run(sim, "a b", max_tokens=20, temperature=0))
    stop = tokens[3]
    cut = tokens.index(stop)
    stopped = await _run(sim, "a b", max_tokens=20, temperature=0, stop_token_ids=(stop,))
    assert stopped[-1].finish_reason == "stop" and _tokens(stopped) == tokens[:cut + 1]
    assert _text(stopped) == "".join(" " + WORDS[t] for t in tokens[:cut])
    late = _tokens(await _run(sim, "a b", max_tokens=20, temperature=0, stop_token_ids=(stop,), min_tokens=10))
    assert stop not in late[:10] and len(late) > 10 and late[:cut] == tokens[:cut]
    words = _text(await _run(sim, "a b", max_tokens=20, temperature=0)).split()
    held = await _run(sim, "a b", max_tokens=20, temperature=0, stop=(words[1],), min_tokens=20)
    assert held[-1].finish_reason == "length" and len(_tokens(held)) == 20
    with pytest.raises(InvalidArgument) as caught:
        await _run(sim, "a b", stop_token_ids=(len(WORDS),))
    assert caught.value.field == "stop_token_ids"


async def test_sim_min_p_one_decodes_greedily_and_logprobs_name_their_words(sim: Engine) -> None:
    greedy = await _run(sim, "x y", max_tokens=12, temperature=0, logprobs=3)
    assert _tokens(await _run(sim, "x y", max_tokens=12, seed=9, min_p=1.0)) == _tokens(greedy)
    assert _tokens(await _run(sim, "x y", max_tokens=12, seed=9)) != _tokens(greedy)
    logprobs = [lp for d in greedy for lp in d.logprobs]
    assert "".join(lp.token for lp in logprobs) == _text(greedy)
    for lp in logprobs:
        assert lp.logprob == FAVOURITE and lp.top[0] == (lp.token_id, FAVOURITE) and len(lp.top) == 3
        assert list(lp.top_tokens) == [" " + WORDS[t] for t, _ in lp.top]
    assert math.isclose(math.exp(FAVOURITE) + 31 * math.exp(OTHER), 1.0)  # a distribution


async def test_sim_prompt_logprobs_are_deterministic_and_score_its_own_output(sim: Engine) -> None:
    first = (await _run(sim, "hello  there", max_tokens=4, temperature=0, prompt_logprobs=2))[0]
    assert first == (await _run(sim, "hello  there", max_tokens=4, temperature=0, prompt_logprobs=2))[0]
    assert [e.token for e in first.prompt_logprobs] == ["hello", "  there"]  # they join to the prompt
    assert len(first.prompt_token_ids) == 2 and first.prompt_logprobs[0].logprob == 0.0
    assert not first.prompt_logprobs[0].top and len(first.prompt_logprobs[1].top) == 2
    prompt = "hello"
    for _ in range(4):  # a prompt grown by the sim's own greedy word scores 1/2 at each word
        prompt += _text(await _run(sim, prompt, max_tokens=1, temperature=0))
    echoed = (await _run(sim, prompt, max_tokens=1, prompt_logprobs=0))[0]
    assert [e.logprob for e in echoed.prompt_logprobs[1:]] == [FAVOURITE] * 4
    assert echoed.prompt_token_ids[1:] == tuple(WORDS.index(w) for w in prompt.split()[1:])
    other = (await _run(sim, "hello zulu zulu zulu", max_tokens=1, prompt_logprobs=0))[0]
    assert {e.logprob for e in other.prompt_logprobs[1:]} <= {FAVOURITE, OTHER}
    resumed = await _run(sim, "hello", (1, 2), max_tokens=5, prompt_logprobs=1)
    assert not any(d.prompt_logprobs for d in resumed)
