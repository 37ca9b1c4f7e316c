"""Prefix caching: shared prompt prefixes reuse their KV, and the output does not change."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from maas.services.worker.engines.base import Delta, GenerationRequest, ModelSpec, SamplingParams
from maas.services.worker.engines.hf import HFEngine
from maas.services.worker.engines.prefix import PrefixCache

SYSTEM = "# You are a helpful assistant that writes small, correct Python functions.\n" * 3


def kv(n: int, value: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    t = torch.full((1, 2, n, 4), value)
    return [(t, t.clone())]


def test_lookup_finds_the_longest_shared_block_aligned_prefix():
    cache = PrefixCache(budget_tokens=1000, block=4)
    prompt = list(range(23))
    cache.insert("", prompt, kv(23))  # stores 20 tokens (leaves >= 1 to compute)
    assert cache.lookup("", prompt)[0] == 20  # type: ignore[index]
    shared = list(range(9)) + [99, 98, 97, 96, 95]  # shares 9 tokens: two blocks
    length, got = cache.lookup("", shared)  # type: ignore[misc]
    assert length == 8 and got[0][0].shape[2] == 8
    assert cache.lookup("", [5, 6, 7, 8, 9, 10]) is None
    assert cache.lookup("adapter@1", prompt) is None  # an adapter has its own keys and values
    assert 0 < cache.hit_rate < 1


def test_the_cache_is_bounded_and_evicts_least_recently_used():
    cache = PrefixCache(budget_tokens=16, block=4)
    cache.insert("", list(range(9)), kv(9))           # 8 tokens
    cache.insert("", list(range(100, 109)), kv(9))     # 8 tokens: full
    assert cache.lookup("", list(range(9))) is not None  # touch the first
    cache.insert("", list(range(200, 209)), kv(9))     # evicts the second
    assert cache.tokens == 16
    assert cache.lookup("", list(range(100, 109))) is None
    assert cache.lookup("", list(range(9))) is not None


async def generate(engine: HFEngine, prompt: str) -> list[Delta]:
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    return [d async for d in engine.generate(GenerationRequest("r", prompt, params))]


@pytest.fixture
async def engines(demo_model_dir: Path) -> AsyncIterator[tuple[HFEngine, HFEngine]]:
    cached = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir)))
    plain = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options={"prefix_cache_mb": "0"}))
    await cached.load()
    await plain.load()
    yield cached, plain
    await cached.close()
    await plain.close()


async def test_a_shared_system_prompt_is_reused_and_the_output_is_unchanged(engines: tuple[HFEngine, HFEngine]):
    cached, plain = engines
    first, second = SYSTEM + "def add(a, b):", SYSTEM + "def parse(text):"
    miss = await generate(cached, first)
    assert miss[-1].cached_prompt_tokens == 0
    hit = await generate(cached, second)
    assert hit[-1].cached_prompt_tokens >= 32  # the shared system prompt, block-aligned
    assert cached.stats().prefix_hit_rate > 0
    for prompt, got in ((first, miss), (second, hit)):
        expected = await generate(plain, prompt)
        assert [t for d in got for t in d.token_ids] == [t for d in expected for t in d.token_ids]


async def test_hits_and_misses_prefill_together_exactly(engines: tuple[HFEngine, HFEngine]):
    import asyncio

    cached, plain = engines
    await generate(cached, SYSTEM + "x = 1")  # warm the cache with the system prompt
    prompts = [SYSTEM + "def mul(a, b):", "import os\nimport sys\n" * 6 + "def main(", SYSTEM + "class A:"]
    together = await asyncio.gather(*(generate(cached, p) for p in prompts))
    assert [d[-1].cached_prompt_tokens > 0 for d in together] == [True, False, True]
    for prompt, got in zip(prompts, together, strict=True):
        expected = await generate(plain, prompt)
        assert [t for d in got for t in d.token_ids] == [t for d in expected for t in d.token_ids]
