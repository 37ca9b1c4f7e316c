"""max_tokens beyond the model's context is a clear INVALID_ARGUMENT: in the engines (the
prompt plus max_tokens must fit the context) and, as a cheap absolute bound, at the HTTP door."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from maas.mesh.errors import InvalidArgument
from maas.services.router import openai_api
from maas.services.router.http import _error
from maas.services.worker.engines import create_engine
from maas.services.worker.engines.base import (
    Delta,
    Engine,
    GenerationRequest,
    ModelSpec,
    SamplingParams,
    check_context,
)
from maas.services.worker.engines.hf import _DEFAULT_CONTEXT, _context_length

CHAT = [{"role": "user", "content": "hi"}]


async def _run(engine: Engine, prompt: str, resume: tuple[int, ...] = (), **params: object) -> list[Delta]:
    request = GenerationRequest("r", prompt, SamplingParams(**params), resume_token_ids=resume)  # type: ignore[arg-type]
    return [d async for d in engine.generate(request)]


def test_check_context_names_max_tokens_the_prompt_and_the_limit() -> None:
    check_context(SamplingParams(max_tokens=2043), 5, 2048)  # exactly full: fits
    with pytest.raises(InvalidArgument) as refused:
        check_context(SamplingParams(max_tokens=1_000_000_000), 5, 2048)
    assert refused.value.field == "max_tokens"
    assert refused.value.message == ("max_tokens 1000000000 plus the prompt's 5 tokens exceeds the model's "
                                     "context of 2048 tokens")


# --- the simulator: its context is in words ------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[Engine]:
    engine = create_engine(ModelSpec("sim", 1, "sim", "", options={"token_delay_ms": "0", "context_length": "16"}))
    await engine.load()
    yield engine
    await engine.close()


async def test_sim_refuses_a_prompt_plus_max_tokens_beyond_its_context(sim: Engine) -> None:
    with pytest.raises(InvalidArgument, match="max_tokens 1000000000 plus the prompt's 3 tokens exceeds "
                                              "the model's context of 16 tokens") as refused:
        await _run(sim, "one two three", max_tokens=1_000_000_000)
    assert refused.value.field == "max_tokens"
    with pytest.raises(InvalidArgument, match="max_tokens 14 plus the prompt's 3 tokens"):
        await _run(sim, "one two three", max_tokens=14)
    deltas = await _run(sim, "one two three", max_tokens=13)  # fills the context exactly
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("length", 13)


async def test_sim_resumed_tokens_count_within_max_tokens(sim: Engine) -> None:
    full = await _run(sim, "one two three", max_tokens=13, seed=1)
    ids = tuple(t for d in full for t in d.token_ids)
    rest = await _run(sim, "one two three", ids[:5], max_tokens=13, seed=1)
    assert tuple(t for d in rest for t in d.token_ids) == ids[5:]


# --- the transformers engine on the forged demo model --------------------------------------


@pytest.fixture
async def hf(demo_model_dir: Path) -> AsyncIterator[Engine]:
    engine = create_engine(ModelSpec("demo", 1, "hf", str(demo_model_dir)))
    await engine.load()
    yield engine
    await engine.close()


async def test_hf_refuses_max_tokens_beyond_the_models_context(hf: Engine) -> None:
    prompt = "def add(a, b):"
    tokens = len(hf._tokenizer(prompt)["input_ids"])  # type: ignore[attr-defined]
    assert hf.context_length == 1024  # the demo model's max_position_embeddings
    with pytest.raises(InvalidArgument) as refused:
        await _run(hf, prompt, max_tokens=1_000_000_000)
    assert refused.value.field == "max_tokens"
    assert refused.value.message == (f"max_tokens 1000000000 plus the prompt's {tokens} tokens exceeds the "
                                     "model's context of 1024 tokens")
    with pytest.raises(InvalidArgument, match=f"max_tokens {1025 - tokens} plus"):
        await _run(hf, prompt, max_tokens=1025 - tokens)
    assert hf.stats().running == 0 and hf.stats().waiting == 0  # refused before anything was reserved


async def test_hf_a_lowered_context_is_the_limit_and_a_request_may_fill_it(demo_model_dir: Path) -> None:
    engine = create_engine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options={"context_length": "24"}))
    await engine.load()
    try:
        prompt = "import os"
        tokens = len(engine._tokenizer(prompt)["input_ids"])  # type: ignore[attr-defined]
        with pytest.raises(InvalidArgument, match=f"plus the prompt's {tokens} tokens exceeds the model's "
                                                  "context of 24 tokens"):
            await _run(engine, prompt, max_tokens=25 - tokens, ignore_eos=True)
        deltas = await _run(engine, prompt, max_tokens=24 - tokens, temperature=0, ignore_eos=True)
        assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("length", 24 - tokens)
    finally:
        await engine.close()


@pytest.mark.parametrize("positions, stated, context", [
    (4096, 512, 4096),             # the config's max_position_embeddings
    (None, 8192, 8192),            # none: the tokenizer's model_max_length
    (None, int(1e30), _DEFAULT_CONTEXT),  # transformers' "not set"
    (None, None, _DEFAULT_CONTEXT),
])
def test_the_context_length_of_a_transformers_model(positions: int | None, stated: int | None, context: int) -> None:
    config = SimpleNamespace(max_position_embeddings=positions)
    tokenizer = SimpleNamespace(model_max_length=stated)
    assert _context_length(config, tokenizer) == context


# --- the HTTP API's absolute bound ---------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [1_000_000_000, openai_api.MAX_TOKENS + 1, 0, -5])
def test_a_chat_max_tokens_out_of_bounds_is_a_400_naming_the_limit(field: str, value: int) -> None:
    with pytest.raises(InvalidArgument) as refused:
        openai_api.chat_request({"model": "m", "messages": CHAT, field: value})
    status, body, _ = _error(refused.value)
    assert status == 400 and body["error"]["param"] == field
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_argument"
    assert body["error"]["message"] == f"{field} must be in [1, {openai_api.MAX_TOKENS}], got {value}"


def test_a_completion_max_tokens_out_of_bounds_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"max_tokens must be in \[1, 1048576\], got 1000000000"):
        openai_api.completion_request({"model": "m", "prompt": "x", "max_tokens": 1_000_000_000})
    request, _ = openai_api.completion_request({"model": "m", "prompt": "x", "max_tokens": openai_api.MAX_TOKENS})
    assert request.params.max_tokens == openai_api.MAX_TOKENS  # the bound itself passes the door


def test_a_chat_without_max_tokens_gets_a_default_that_leaves_room_for_the_prompt() -> None:
    _, given = openai_api.chat_request({"model": "m", "messages": CHAT, "max_completion_tokens": 7})
    request, default = openai_api.chat_request({"model": "m", "messages": CHAT})
    assert given.max_tokens_given and not default.max_tokens_given
    assert request.params.max_tokens == openai_api.DEFAULT_CHAT_MAX_TOKENS
    assert openai_api.chat_max_tokens(0) == openai_api.DEFAULT_CHAT_MAX_TOKENS  # context not known
    assert openai_api.chat_max_tokens(1024) == 512
    assert openai_api.chat_max_tokens(8192) == openai_api.DEFAULT_CHAT_MAX_TOKENS
