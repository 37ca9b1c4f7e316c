"""Benchmark: what constrained decoding costs per token on the engine's batch (issue 15).

The hf engine in this process on the forged demo model (or --model), --batch requests
submitted at once, each asking for --new-tokens tokens, seeded sampling (temperature 1):

  free         no grammar (EOS ignored, so every request makes --new-tokens tokens)
  constrained  every request under a JSON schema that cannot end before --new-tokens
               (an array of at least that many integers: no request stops early)
  mixed        half of each, in one batch

Time per generated token of each, best of --rounds. Then the mask computation alone, per
row and step, for llguidance (the engine's) and, when installed, xgrammar, on the same
schema and tokenizer: the figure behind the choice of library (engines/guide.py).
Last line:

  constrained_vs_free_token_time=<a> mixed_vs_free_token_time=<b> llguidance_mask_us=<c> xgrammar_mask_us=<d|na>

a, b: time per token over the free batch's; c, d: microseconds per row per step.

    python bench/structured.py [--model DIR] [--batch 16] [--new-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

from maas.models.forge import DEFAULT_STEPS, FORGE_VERSION, forge_demo_model
from maas.services.worker.engines.base import GenerationRequest, GuideSpec, ModelSpec, SamplingParams
from maas.services.worker.engines.hf import HFEngine

PROMPTS = ["def add(a, b):", "import os\n", "class Parser(object):", "for i in range(", "numbers = ["]


def schema(tokens: int) -> str:
    return json.dumps({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                       "minItems": tokens})


async def run(engine: HFEngine, batch: int, tokens: int, guided: list[bool]) -> tuple[float, int]:
    """(seconds, tokens made) for `batch` requests at once; guided[i]: request i is constrained."""
    async def one(i: int) -> int:
        params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True,
                                guide=GuideSpec("json_schema", schema(tokens)) if guided[i] else None)
        request = GenerationRequest(f"r{i}", PROMPTS[i % len(PROMPTS)], params)
        return sum([len(d.token_ids) async for d in engine.generate(request)])

    start = time.perf_counter()
    made = await asyncio.gather(*(one(i) for i in range(batch)))
    return time.perf_counter() - start, sum(made)


def mask_costs(model_dir: Path, tokens: int, rows: int = 16, steps: int = 64) -> tuple[float, float | None]:
    """Microseconds to compute one row's mask, llguidance and xgrammar (None if absent)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tokenizer)
    text = schema(tokens)
    g = torch.Generator().manual_seed(0)

    import llguidance
    import llguidance.hf
    import llguidance.torch

    ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
    matchers = [llguidance.LLMatcher(ll, grammar) for _ in range(rows)]
    bitmask = llguidance.torch.allocate_token_bitmask(rows, vocab)
    spent = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(m, bitmask, i)
        spent += time.perf_counter() - start
        logits = torch.randn(rows, vocab, generator=g)
        allowed = ((bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().reshape(rows, -1)
        for m, t in zip(matchers, logits.masked_fill(~allowed[:, :vocab], -1e9).argmax(-1).tolist(), strict=True):
            m.consume_token(t)
    ll_us = spent / steps / rows * 1e6
    try:
        import xgrammar as xgr
    except ImportError:
        return ll_us, None
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(text, any_whitespace=False)
    xs = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    bitmask = xgr.allocate_token_bitmask(rows, vocab)
    spent = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        for i, m in enumerate(xs):
            m.fill_next_token_bitmask(bitmask, i)
        spent += time.perf_counter() - start
        logits = torch.randn(rows, vocab, generator=g)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        for m, t in zip(xs, logits.argmax(-1).tolist(), strict=True):
            m.accept_token(t)
    return ll_us, spent / steps / rows * 1e6


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face model directory (default: demo)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = args.model or forge_demo_model(
        Path.home() / ".cache" / "maas-mesh" / "test-models" / f"demo-v{FORGE_VERSION}-seed0-steps{DEFAULT_STEPS}")
    engine = HFEngine(ModelSpec("bench", 1, "hf", str(model), device=args.device))
    await engine.load()
    try:
        b, n = args.batch, args.new_tokens
        await run(engine, b, 4, [False] * b)  # warm up
        cases = {"free": [False] * b, "constrained": [True] * b, "mixed": [i % 2 == 0 for i in range(b)]}
        per_token: dict[str, float] = {}
        for name, guided in cases.items():
            best = float("inf")
            for _ in range(args.rounds):
                seconds, made = await run(engine, b, n, guided)
                assert made == b * n, f"{name}: {made} tokens, not {b * n}"
                best = min(best, seconds / made)
            per_token[name] = best
            print(f"{name:12s} {b} requests x {n} tokens: {best * 1e3:.3f} ms per token "
                  f"({1 / best:.0f} tokens/s)")
    finally:
        await engine.close()
    ll_us, xg_us = mask_costs(model, n)
    print(f"mask per row per step: llguidance {ll_us:.1f} us, xgrammar "
          f"{'not installed' if xg_us is None else f'{xg_us:.1f} us'}")
    print(f"constrained_vs_free_token_time={per_token['constrained'] / per_token['free']:.2f} "
          f"mixed_vs_free_token_time={per_token['mixed'] / per_token['free']:.2f} "
          f"llguidance_mask_us={ll_us:.1f} xgrammar_mask_us={'na' if xg_us is None else f'{xg_us:.1f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
