"""LoRA adapters in the batching engine: chosen per request, sharing one batch, loaded and
evicted at run time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from maas.mesh.errors import FailedPrecondition
from maas.services.worker.engines.base import AdapterRef, GenerationRequest, ModelSpec, SamplingParams
from maas.services.worker.engines.hf import HFEngine

PROMPT = "def add(a, b):"


def make_adapter(base: Path, dest: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights, so it visibly changes the output."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def adapters(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterRef]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: AdapterRef(f"{name}@1", str(make_adapter(demo_model_dir, root / name, seed)))
            for name, seed in (("a", 1), ("b", 2), ("c", 3))}


@pytest.fixture
async def engine(demo_model_dir: Path) -> AsyncIterator[HFEngine]:
    e = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options={"max_adapters": "2"}))
    await e.load()
    yield e
    await e.close()


async def tokens(engine: HFEngine, adapter: AdapterRef | None, request_id: str = "r") -> list[int]:
    request = GenerationRequest(request_id, PROMPT, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
                                adapter=adapter)
    return [t async for d in engine.generate(request) for t in d.token_ids]


async def test_adapters_change_the_output_and_share_a_batch(engine: HFEngine, adapters: dict[str, AdapterRef]):
    base = await tokens(engine, None)
    alone = {name: await tokens(engine, adapters[name]) for name in ("a", "b")}
    assert alone["a"] != base and alone["b"] != base and alone["a"] != alone["b"]
    mixed = await asyncio.gather(tokens(engine, adapters["a"], "1"), tokens(engine, None, "2"),
                                 tokens(engine, adapters["b"], "3"))
    assert mixed == [alone["a"], base, alone["b"]]


async def test_least_recently_used_adapter_is_evicted_and_reloads(engine: HFEngine, adapters: dict[str, AdapterRef]):
    first = await tokens(engine, adapters["a"])
    await tokens(engine, adapters["b"])
    await tokens(engine, adapters["c"])  # max_adapters=2: "a" (least recently used) goes
    assert list(engine._adapters) == ["b@1", "c@1"]
    assert await tokens(engine, adapters["a"]) == first  # loads again, same output
    assert list(engine._adapters) == ["c@1", "a@1"]


async def test_a_broken_adapter_fails_only_its_request(engine: HFEngine, tmp_path: Path):
    broken = AdapterRef("broken@1", str(tmp_path / "missing"))
    with pytest.raises(FailedPrecondition, match="cannot load adapter broken@1"):
        await tokens(engine, broken)
    assert len(await tokens(engine, None)) == 16


async def test_new_adapters_arriving_together_are_not_evicted_before_they_run(
        engine: HFEngine, adapters: dict[str, AdapterRef]):
    alone = {name: await tokens(engine, adapters[name]) for name in ("a", "b", "c")}
    await engine.close()
    await engine.load()  # fresh: no adapter loaded; max_adapters=2 but three arrive at once
    together = await asyncio.gather(*(tokens(engine, adapters[n], n) for n in ("a", "b", "c")))
    assert together == [alone["a"], alone["b"], alone["c"]]
    assert len(await tokens(engine, None)) == 16  # and the engine is alive


async def test_a_failed_adapter_load_leaves_the_base_model_untouched(engine: HFEngine, tmp_path: Path,
                                                                     demo_model_dir: Path):
    base = await tokens(engine, None)
    # an adapter for a differently shaped model: peft injects layers, then fails on the weights
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "odd")
    with pytest.raises(FailedPrecondition):
        await tokens(engine, AdapterRef("odd@1", str(tmp_path / "odd")))
    assert await tokens(engine, None) == base
