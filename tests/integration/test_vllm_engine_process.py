"""A killed engine process takes vLLM's engine core (its child) with it. In a module of its
own: it loads an engine of its own, and beside test_vllm_engine.py's module-scoped engine,
still alive until that module ends, loading took twice as long on 2 cores. Skipped where
MAAS_VLLM_PYTHON names no environment with vLLM (`make test` makes one)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from maas.mesh.errors import EngineDead
from maas.services.worker.engines import create_engine
from maas.services.worker.engines.base import GenerationRequest, ModelSpec, SamplingParams
from maas.services.worker.engines.process import ProcessEngine

from .test_vllm_engine import OPTIONS, PROMPTS, _alive, _children, needs_vllm

pytestmark = [pytest.mark.slow, needs_vllm]


async def test_a_killed_engine_process_takes_vllms_core_with_it(demo_model_dir: Path):
    engine = create_engine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options={**OPTIONS, "max_adapters": "0"}))
    assert isinstance(engine, ProcessEngine)
    await engine.load()
    try:
        assert engine._process is not None
        core = _children(engine._process.pid)
        assert core, "vLLM's engine core process was not found"
        stream = engine.generate(GenerationRequest("doomed", PROMPTS[3], SamplingParams(max_tokens=900, ignore_eos=True)))
        with pytest.raises(EngineDead):
            async for _ in stream:
                engine._process.kill()
        for _ in range(50):
            if not any(_alive(pid) for pid in core):
                break
            await asyncio.sleep(0.1)
        assert not any(_alive(pid) for pid in core), "vLLM's engine core outlived its engine process"
    finally:
        await engine.close()
