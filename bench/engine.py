"""Benchmark: the continuous-batching engine against plain `model.generate`.

Same model, same process, same run. For 1, 8, 32 and 64 concurrent requests (64 new
tokens each, greedy, EOS ignored so every request produces exactly 64 tokens):

  sequential  the requests one after another through `model.generate`
  static      all of them as one left-padded batch through `model.generate` (the bound)
  engine      all of them submitted at once to the engine (HFEngine)

and the time to first token of a request that arrives while 31 others are decoding.
Levels below 8 are run in rounds (8 // level of them) and averaged, so each figure covers
at least 8 requests.
Prints a table; the last line is machine-readable:

  engine32_vs_sequential=<x> engine32_vs_static=<y> ttft_p50_ms=<z>

    python bench/engine.py [--model DIR] [--device cpu|cuda:0] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from maas.models.forge import forge_demo_model
from maas.services.worker.engines.base import GenerationRequest, ModelSpec, SamplingParams
from maas.services.worker.engines.hf import HFEngine

PROMPT_STEMS = [
    "def add(a, b):", "import os\n", "class Parser(object):\n    def __init__(self", "for i in range(",
    "    return self.", "if __name__ == '__main__':", "try:\n    import json\nexcept", "with open(path) as f:",
]


def prompts(n: int, salt: str = "") -> list[str]:
    """n distinct prompts of varied length. They differ from their first token on (and
    between salts), so the engine's prefix cache gives no help the baselines lack."""
    return [f"# {salt}{i}\n" + PROMPT_STEMS[i % len(PROMPT_STEMS)] + " x = 1;" * (i % 5) for i in range(n)]


def sequential(model, tokenizer, texts: list[str], new: int, device: torch.device) -> float:
    start = time.perf_counter()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    return len(texts) * new / (time.perf_counter() - start)


def static(model, tokenizer, texts: list[str], new: int, device: torch.device) -> float:
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    start = time.perf_counter()
    model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id)
    return len(texts) * new / (time.perf_counter() - start)


async def engine_rate(engine: HFEngine, texts: list[str], new: int) -> float:
    async def one(i: int, text: str) -> int:
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        count = 0
        async for delta in engine.generate(GenerationRequest(f"b{i}", text, params)):
            count = delta.completion_tokens or count + len(delta.token_ids)
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
    elapsed = time.perf_counter() - start
    assert all(c == new for c in counts), counts
    return sum(counts) / elapsed


async def ttft_under_load(engine: HFEngine, background: int, probes: int) -> list[float]:
    """TTFT of requests arriving one at a time while `background` long requests decode."""
    started = asyncio.Event()
    decoding: set[int] = set()

    async def long(i: int) -> None:
        params = SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True)
        async for _ in engine.generate(GenerationRequest(f"bg{i}", prompts(background, "bg-")[i], params)):
            decoding.add(i)
            if len(decoding) >= background:
                started.set()

    tasks = [asyncio.create_task(long(i)) for i in range(background)]
    await started.wait()
    ttfts = []
    for i in range(probes):
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        stream = engine.generate(GenerationRequest(f"probe{i}", prompts(probes, "probe-")[i],
                                                   SamplingParams(max_tokens=1, temperature=0)))
        async for _ in stream:
            ttfts.append(time.perf_counter() - t0)
            break
        await stream.aclose()  # type: ignore[attr-defined]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return ttfts


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="model directory (default: the forged demo model)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="engine option, e.g. prefix_cache_mb=0 (see maas/services/worker/engines/hf.py)")
    parser.add_argument("--sequential-requests", type=int, default=8,
                        help="requests timed for the sequential rate (it does not depend on concurrency)")
    args = parser.parse_args()
    source = args.model or str(forge_demo_model(Path.home() / ".cache" / "maas-mesh" / "bench-models" / "demo"))
    device = torch.device(args.device)
    new = args.new_tokens
    levels = [int(x) for x in args.levels.split(",")]

    tokenizer = AutoTokenizer.from_pretrained(source)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    engine = HFEngine(ModelSpec(name="bench", version=1, format="hf", source=source, device=str(device),
                                options={"max_batch": str(max(levels)),
                                         **dict(o.split("=", 1) for o in args.option)}))
    await engine.load()
    params = sum(p.numel() for p in model.parameters())
    print(f"model {source} ({params / 1e6:.1f}M parameters) on {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {new} new tokens per request", flush=True)

    with torch.inference_mode():
        sequential(model, tokenizer, prompts(2), 8, device)  # warm up
        static(model, tokenizer, prompts(4), 8, device)
    await engine_rate(engine, prompts(4), 8)
    with torch.inference_mode():
        seq_rate = sequential(model, tokenizer, prompts(args.sequential_requests), new, device)

    rows = []
    for level in levels:
        # small levels are repeated (fresh prompts each round) so every figure covers >= 8 requests
        rounds = [prompts(level, salt=f"L{level}R{r}-") for r in range(max(1, 8 // level))]
        with torch.inference_mode():
            static_rate = statistics.mean(static(model, tokenizer, texts, new, device) for texts in rounds)
        engine_tps = statistics.mean([await engine_rate(engine, texts, new) for texts in rounds])
        rows.append((level, seq_rate, static_rate, engine_tps))

    ttfts = await ttft_under_load(engine, background=31, probes=15)
    await engine.close()

    print(f"\n{'concurrent':>10} {'sequential':>12} {'static':>10} {'engine':>10} {'vs seq':>8} {'vs static':>10}")
    for level, s, st, e in rows:
        print(f"{level:>10} {s:>10.0f}/s {st:>8.0f}/s {e:>8.0f}/s {e / s:>7.2f}x {e / st:>9.2f}x")
    p50 = statistics.median(ttfts) * 1000
    p90 = sorted(ttfts)[int(len(ttfts) * 0.9)] * 1000
    print(f"\ntime to first token with 31 requests decoding: p50 {p50:.1f} ms, p90 {p90:.1f} ms "
          f"({len(ttfts)} probes)")
    at32 = next((r for r in rows if r[0] == 32), rows[-1])
    print(f"engine32_vs_sequential={at32[3] / at32[1]:.2f} engine32_vs_static={at32[3] / at32[2]:.2f} "
          f"ttft_p50_ms={p50:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
