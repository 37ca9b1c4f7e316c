"""Constrained decoding in the hf engine (engines/guide.py) on the forged demo model: the
output always follows the grammar, batches with free requests without changing them, and
resumes exactly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest
import torch

from maas.mesh.errors import InvalidArgument
from maas.services.worker.engines import create_engine
from maas.services.worker.engines.base import (
    Delta,
    Engine,
    GenerationRequest,
    GuideSpec,
    ModelSpec,
    SamplingParams,
)
from maas.services.worker.engines.guide import apply_masks

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
PROMPT = "def parse(text):\n    return"


@pytest.fixture
async def hf(demo_model_dir: Path) -> AsyncIterator[Engine]:
    engine = create_engine(ModelSpec("demo", 1, "hf", str(demo_model_dir)), own_process=False)
    await engine.load()
    yield engine
    await engine.close()


async def _run(engine: Engine, prompt: str = PROMPT, resume: tuple[int, ...] = (), request_id: str = "r",
               **params: object) -> list[Delta]:
    request = GenerationRequest(request_id, prompt, SamplingParams(**params), resume_token_ids=resume)  # type: ignore[arg-type]
    return [d async for d in engine.generate(request)]


def _text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def _tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def test_masks_keep_exactly_the_allowed_tokens() -> None:
    logits = torch.zeros(3, 70)
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 0b101          # tokens 0 and 2
    bitmask[1, 2] = 1 << 5         # token 69
    apply_masks(logits, [0, 2], bitmask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(logits[1]).all()  # an unguided row is untouched
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [69]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_json_schema_output_always_validates(hf: Engine, temperature: float) -> None:
    guide = GuideSpec("json_schema", json.dumps(SCHEMA))
    for seed in range(3):
        deltas = await _run(hf, max_tokens=120, temperature=temperature, seed=seed, guide=guide)
        assert deltas[-1].finish_reason == "stop", _text(deltas)  # the grammar ended it, not max_tokens
        jsonschema.validate(json.loads(_text(deltas)), SCHEMA)


async def test_json_object_and_regex(hf: Engine) -> None:
    out = _text(await _run(hf, max_tokens=200, temperature=0.7, seed=3, guide=GuideSpec("json_object")))
    assert isinstance(json.loads(out), dict)
    deltas = await _run(hf, max_tokens=30, temperature=0.0, guide=GuideSpec("regex", r"(yes|no), [0-9]{2,4}"))
    assert deltas[-1].finish_reason == "stop"
    import re
    assert re.fullmatch(r"(yes|no), [0-9]{2,4}", _text(deltas)), _text(deltas)


async def test_a_constrained_request_batches_with_free_ones_without_changing_them(hf: Engine) -> None:
    free = dict(max_tokens=40, temperature=0.8, seed=5, ignore_eos=True)
    alone = await _run(hf, "import os\n", **free)
    guided = dict(max_tokens=120, temperature=0.0, guide=GuideSpec("json_schema", json.dumps(SCHEMA)))
    together = await asyncio.gather(_run(hf, "import os\n", request_id="a", **free),
                                     _run(hf, request_id="b", **guided))
    assert _tokens(together[0]) == _tokens(alone)
    jsonschema.validate(json.loads(_text(together[1])), SCHEMA)


async def test_a_resumed_constrained_request_continues_identically(hf: Engine) -> None:
    params = dict(max_tokens=120, temperature=1.0, seed=9, guide=GuideSpec("json_schema", json.dumps(SCHEMA)))
    full = _tokens(await _run(hf, **params))
    rest = _tokens(await _run(hf, resume=tuple(full[:6]), **params))
    assert full[:6] + rest == full


async def test_a_bad_grammar_is_a_clear_invalid_argument(hf: Engine) -> None:
    with pytest.raises(InvalidArgument, match="json schema cannot be used: .*foo"):
        await _run(hf, guide=GuideSpec("json_schema", '{"type": "foo"}'))
    with pytest.raises(InvalidArgument, match="not JSON"):
        await _run(hf, guide=GuideSpec("json_schema", "{nope"))
    with pytest.raises(InvalidArgument, match="do not follow"):
        await _run(hf, resume=(5, 6, 7), guide=GuideSpec("regex", "[0-9]+"))


async def test_the_sim_engine_refuses_a_guide() -> None:
    sim = create_engine(ModelSpec("echo", 1, "sim", ""), own_process=False)
    await sim.load()
    with pytest.raises(InvalidArgument, match="no constrained decoding"):
        await _run(sim, guide=GuideSpec("json_object"))
