"""Benchmark: the executor alone, in process (issue 13).

A three-step pipeline (template -> generate -> guard) against an in-process fake model
that yields three chunks at once, run N times one after another; the baseline is the same
fake model's stream read directly, in the same run. No router, no network: what the
executor's own bookkeeping (tasks, budgets, spans, stream wrappers, the template's worker
thread) costs per request. Last line:

  executor_first_chunk_us_p50=<a> direct_first_chunk_us_p50=<b> overhead_us_p50=<a-b>

    python bench/pipeline_executor.py            # --runs 3000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from maas.pipelines.executor import PipelineInput, Run
from maas.pipelines.spec import parse

SPEC = parse("""
steps:
  - {name: prompt, kind: template, template: "Q: {{ input.text }}"}
  - {name: answer, kind: generate, model: m, input: steps.prompt}
  - {name: safe, kind: guard, input: steps.answer, block: ["#"]}
""")


class FakeModel:
    async def generate(self, model: str, messages: list[dict[str, str]], params: dict[str, Any], *,
                       deadline: float | None) -> AsyncIterator[str]:
        for word in ("a ", "b ", "c "):
            yield word


async def first_chunk(stream: AsyncIterator[str]) -> float:
    start = time.perf_counter()
    first = None
    async for _ in stream:
        if first is None:
            first = time.perf_counter() - start
    assert first is not None
    return first


async def main(runs: int) -> None:
    model = FakeModel()
    question = [{"role": "user", "content": "hi"}]
    piped, direct = [], []
    for _ in range(runs):
        direct.append(await first_chunk(model.generate("m", question, {}, deadline=None)))
        piped.append(await first_chunk(Run(SPEC, model, PipelineInput(question)).answer()))  # type: ignore[arg-type]
    a, b = sorted(piped)[runs // 2] * 1e6, sorted(direct)[runs // 2] * 1e6
    print(f"{runs} runs of template -> generate (fake, in process) -> guard")
    print(f"executor_first_chunk_us_p50={a:.0f} direct_first_chunk_us_p50={b:.0f} overhead_us_p50={a - b:.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3000)
    asyncio.run(main(parser.parse_args().runs))
