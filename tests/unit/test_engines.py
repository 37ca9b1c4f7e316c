"""Engines: the simulator and the transformers engine on the forged demo model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from maas.mesh.errors import EngineDead, InvalidArgument
from maas.services.worker.engines import create_engine
from maas.services.worker.engines.base import Delta, Engine, GenerationRequest, ModelSpec, SamplingParams


async def _collect(
    engine: Engine, prompt: str, resume: tuple[int, ...] = (), **params: object
) -> list[Delta]:
    request = GenerationRequest("req-1", prompt, SamplingParams(**params), resume_token_ids=resume)  # type: ignore[arg-type]
    return [delta async for delta in engine.generate(request)]


def _text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def _tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def test_unknown_format_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="onnx"):
        create_engine(ModelSpec("m", 1, "onnx", "/nowhere"))


# --- simulator ---------------------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[Engine]:
    engine = create_engine(
        ModelSpec("sim", 1, "sim", "", options={"token_delay_ms": "0", "context_length": "64"})
    )
    await engine.load()
    yield engine
    await engine.close()


async def test_sim_is_deterministic(sim: Engine) -> None:
    greedy = await _collect(sim, "hello there", max_tokens=12, temperature=0)
    assert greedy == await _collect(sim, "hello there", max_tokens=12, temperature=0, seed=99)
    seeded = await _collect(sim, "hello there", max_tokens=12, seed=5)
    assert seeded == await _collect(sim, "hello there", max_tokens=12, seed=5)
    assert _text(seeded) != _text(await _collect(sim, "hello there", max_tokens=12, seed=6))
    assert len(_text(greedy).split()) == 12


async def test_sim_max_tokens_and_context(sim: Engine) -> None:
    deltas = await _collect(sim, "one two three", max_tokens=5)
    last = deltas[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 3, 5)
    assert len(_tokens(deltas)) == 5
    full = await _collect(sim, "w " * 60, max_tokens=4)  # 60 prompt words, context 64: fills it
    assert full[-1].finish_reason == "length" and full[-1].completion_tokens == 4
    with pytest.raises(InvalidArgument, match="max_tokens 5 plus the prompt's 60 tokens exceeds .* 64"):
        await _collect(sim, "w " * 60, max_tokens=5)
    with pytest.raises(InvalidArgument, match="context"):
        await _collect(sim, "w " * 64)


async def test_sim_stop_strings(sim: Engine) -> None:
    words = _text(await _collect(sim, "a b", max_tokens=10, temperature=0)).split()
    deltas = await _collect(sim, "a b", max_tokens=10, temperature=0, stop=(f" {words[3][:3]}",))
    assert deltas[-1].finish_reason == "stop"
    assert _text(deltas) == "".join(f" {w}" for w in words[:3])


async def test_sim_resume_continues_identically(sim: Engine) -> None:
    full = await _collect(sim, "x y z", max_tokens=10, seed=1)
    tokens = _tokens(full)
    rest = await _collect(sim, "x y z", tuple(tokens[:4]), max_tokens=10, seed=1)
    assert _tokens(rest) == tokens[4:]
    assert rest[-1].completion_tokens == 10


async def test_a_stream_resumed_after_any_delta_loses_no_text_held_for_a_stop_string(sim: Engine) -> None:
    """What a router's stream migration relies on: text that might begin a stop string is
    held back together with its tokens, so resuming from the tokens sent so far (at any
    delta) reproduces exactly the rest of the text."""
    plain = _text(await _collect(sim, "p q", max_tokens=40, seed=3))
    # stop strings that never match but begin with how some words end: held, then released
    stops = [f"{w[-2:]}~never" for w in plain.split()[:4]]
    full = await _collect(sim, "p q", max_tokens=40, seed=3, stop=tuple(stops))
    unheld = await _collect(sim, "p q", max_tokens=40, seed=3)
    assert _text(full) == plain and 3 < len(full) < len(unheld)  # some text was held back, then released
    for k in range(1, len(full)):
        sent = _tokens(full[:k])
        rest = await _collect(sim, "p q", tuple(sent), max_tokens=40, seed=3, stop=tuple(stops))
        assert _text(full[:k]) + _text(rest) == plain, k


async def test_sim_reacts_to_cancellation_at_once() -> None:
    engine = create_engine(ModelSpec("sim", 1, "sim", "", options={"token_delay_ms": "10000"}))
    await engine.load()
    task = asyncio.create_task(_collect(engine, "hi"))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.5


# --- transformers engine -----------------------------------------------------------------------

PROMPT = "def add(a, b):"


@pytest.fixture
async def hf(demo_model_dir: Path) -> AsyncIterator[Engine]:
    engine = create_engine(ModelSpec("demo", 1, "hf", str(demo_model_dir)), own_process=False)  # tests look inside
    await engine.load()
    yield engine
    await engine.close()


def _forward_counter(engine: Engine) -> list[int]:
    """Count forward passes of the engine's model."""
    calls = [0]
    engine._model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # type: ignore[attr-defined]
    return calls


async def test_engines_loading_at_the_same_time_all_load(demo_model_dir: Path) -> None:
    """A worker given several replicas at once loads them in parallel threads; transformers'
    loading is not thread-safe (without the weights lock every one of these failed)."""
    import asyncio

    for _ in range(2):  # without the lock the first round in a process may pass; later ones failed
        engines = [create_engine(ModelSpec("demo", 1, "hf", str(demo_model_dir)), own_process=False) for _ in range(3)]
        try:
            await asyncio.gather(*(e.load() for e in engines))
            for e in engines:
                assert _text(await _collect(e, "def f():", max_tokens=2))
        finally:
            for e in engines:
                await e.close()


async def test_hf_loads_with_from_pretrained(hf: Engine) -> None:
    assert hf.context_length == 1024
    await hf.load()  # idempotent


async def test_hf_greedy_is_deterministic_and_streams_exact_text(hf: Engine) -> None:
    first = await _collect(hf, PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
    again = await _collect(hf, PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
    # the same tokens and text; how they are split into deltas depends on how fast the reader
    # keeps up (a lagging one gets what piled up as one delta)
    assert (_tokens(again), _text(again)) == (_tokens(first), _text(first))
    tokenizer = hf._tokenizer  # type: ignore[attr-defined]
    assert _text(first) == tokenizer.decode(_tokens(first), skip_special_tokens=True)
    assert _text(first).strip()
    for n in range(1, len(first)):  # every non-final delta ends at a clean text boundary
        assert tokenizer.decode(_tokens(first[:n]), skip_special_tokens=True) == _text(first[:n])


async def test_hf_seeded_sampling_is_reproducible(hf: Engine) -> None:
    params = {"max_tokens": 24, "temperature": 1.0, "ignore_eos": True}
    a = await _collect(hf, PROMPT, seed=11, **params)
    b = await _collect(hf, PROMPT, seed=11, **params)
    assert (_tokens(b), _text(b), b[-1].finish_reason) == (_tokens(a), _text(a), a[-1].finish_reason)
    assert _tokens(a) != _tokens(await _collect(hf, PROMPT, seed=12, **params))


async def test_hf_resume_continues_identically(hf: Engine) -> None:
    params = {"max_tokens": 30, "temperature": 0.9, "top_p": 0.95, "seed": 3, "ignore_eos": True}
    full = await _collect(hf, PROMPT, **params)
    tokens = _tokens(full)
    rest = await _collect(hf, PROMPT, tuple(tokens[:10]), **params)
    assert _tokens(rest) == tokens[10:]
    assert rest[-1].completion_tokens == 30 and rest[-1].finish_reason == "length"


async def test_hf_max_tokens_and_stop(hf: Engine) -> None:
    deltas = await _collect(hf, PROMPT, max_tokens=7, temperature=0, ignore_eos=True)
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens, len(_tokens(deltas))) == ("length", 7, 7)
    text = _text(await _collect(hf, PROMPT, max_tokens=24, temperature=0, ignore_eos=True))
    stop = text[10:13]
    stopped = await _collect(hf, PROMPT, max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,))
    assert stopped[-1].finish_reason == "stop"
    assert _text(stopped) == text[: text.index(stop)]


async def test_hf_rejects_prompt_longer_than_context(hf: Engine) -> None:
    with pytest.raises(InvalidArgument, match=r"prompt is \d+ tokens .* context .* 1024"):
        await _collect(hf, "x = 1\n" * 600)


async def test_hf_keeps_the_event_loop_responsive(hf: Engine) -> None:
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    started = time.monotonic()
    deltas = await _collect(hf, PROMPT, max_tokens=150, temperature=0, ignore_eos=True)
    elapsed = time.monotonic() - started
    tick.cancel()
    assert deltas[-1].completion_tokens == 150
    # Ticking all along (nominally every 5 ms; generous bounds for a busy machine).
    assert len(gaps) > elapsed / 0.05
    assert max(gaps) < elapsed / 4


async def test_hf_closing_the_iterator_stops_decoding(hf: Engine) -> None:
    calls = _forward_counter(hf)
    stream = hf.generate(
        GenerationRequest("r", PROMPT, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    )
    for _ in range(3):
        await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    done = calls[0]
    await asyncio.sleep(0.2)
    assert calls[0] <= done + 1 and done < 400  # leaves the batch at the next step, and stays out
    # The engine is free again.
    assert (await _collect(hf, PROMPT, max_tokens=2))[-1].completion_tokens == 2


async def test_hf_cancelling_the_consumer_stops_decoding(hf: Engine) -> None:
    calls = _forward_counter(hf)
    streaming = asyncio.Event()

    async def consume() -> None:
        request = GenerationRequest(
            "r", PROMPT, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
        )
        async for _ in hf.generate(request):
            streaming.set()

    task = asyncio.create_task(consume())
    await streaming.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    done = calls[0]
    await asyncio.sleep(0.2)
    assert calls[0] <= done + 1 and done < 400


async def test_hf_model_failure_is_engine_dead(hf: Engine) -> None:
    def explode(*_: object) -> None:
        raise RuntimeError("boom")

    hf._model.register_forward_hook(explode)  # type: ignore[attr-defined]
    with pytest.raises(EngineDead, match="boom"):
        await _collect(hf, PROMPT)


async def test_a_lagging_reader_gets_the_deltas_that_piled_up_as_one():
    from maas.services.worker.engines.base import drain

    queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
    for d in (Delta("b", (2,)), Delta("c", (3,), "length", prompt_tokens=4, completion_tokens=3), Delta("x")):
        queue.put_nowait(d)
    merged, error = drain(queue, Delta("a", (1,)))
    # everything up to the last delta, in order, its counts the final ones; nothing past it
    assert merged == Delta("abc", (1, 2, 3), "length", prompt_tokens=4, completion_tokens=3) and error is None
    assert queue.qsize() == 1
    queue.get_nowait()
    boom = ValueError("engine died")
    queue.put_nowait(Delta("b", (2,)))
    queue.put_nowait(boom)
    merged, error = drain(queue, Delta("a", (1,)))
    assert merged == Delta("ab", (1, 2)) and error is boom  # what came before the error is not lost
    assert drain(queue, Delta("z", (9,))) == (Delta("z", (9,)), None)  # nothing waiting: as it came


async def test_a_stream_interval_holds_tokens_but_never_the_first_the_last_or_an_error():
    from maas.services.worker.engines.base import ModelSpec, Pacer

    pacer = Pacer(ModelSpec("m", 1, "sim", "", options={"stream_interval_ms": "5000"}))
    queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    # nothing sent yet: the first delta goes at once
    assert await asyncio.wait_for(pacer.collect(queue, Delta("a", (1,)), None), 1) == (Delta("a", (1,)), None)
    # within the interval: held, merged with what comes, and sent as soon as the last one comes
    loop.call_later(0.05, queue.put_nowait, Delta("c", (3,)))
    loop.call_later(0.1, queue.put_nowait, Delta("d", (4,), "stop", prompt_tokens=2, completion_tokens=4))
    merged, error = await asyncio.wait_for(pacer.collect(queue, Delta("b", (2,)), time.monotonic()), 2.5)
    assert merged == Delta("bcd", (2, 3, 4), "stop", prompt_tokens=2, completion_tokens=4) and error is None
    # an error is not held either, and what came before it is kept
    boom = ValueError("engine died")
    loop.call_later(0.05, queue.put_nowait, boom)
    merged, error = await asyncio.wait_for(pacer.collect(queue, Delta("e", (5,)), time.monotonic()), 2.5)
    assert merged == Delta("e", (5,)) and error is boom
    # the interval over: what piled up goes, nothing waits
    queue.put_nowait(Delta("g", (7,)))
    assert await asyncio.wait_for(pacer.collect(queue, Delta("f", (6,)), time.monotonic() - 10), 1) == \
        (Delta("fg", (6, 7)), None)
