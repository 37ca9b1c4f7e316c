"""Benchmark: what a pipeline adds to time to first token (issue 13).

`maas up --model DIR --workers 1` (the forged demo model), then a pipeline pushed with
`maas pipeline push` that wraps that model the way a real one would:

    template (the question into a prompt) -> generate (demo) -> guard (a blocked phrase)

The same requests (greedy, --max-tokens tokens, one at a time, alternating) go to the
model directly (`model="demo"`, the chat the template would make) and to the pipeline
(`model="bot"`), through the router's gRPC API. TTFT is measured at the client to the
first chunk with text. The guard blocks a one-character phrase, so it holds nothing back
(a guard of an N-character phrase holds back N - 1 characters, which delays the first
text by design and is not counted here). Last line:

  pipeline_ttft_overhead_ms_p50=<a> p99=<b> direct_ttft_ms_p50=<c> pipeline_ttft_ms_p50=<d>

a, b: the pipeline's TTFT minus the direct TTFT of the same request, at the median and at
the 99th percentile over the pairs. Goal (issue 13): a <= 5 ms and b <= 20 ms here.

    python bench/pipeline.py                 # --requests 200 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (the e2e bench's helpers)

PIPELINE = """\
description: the demo model behind a template and a guard
steps:
  - name: prompt
    kind: template
    template: "Question: {{ input.text }}"
  - name: answer
    kind: generate
    model: demo
    input: steps.prompt
    max_tokens: MAX_TOKENS
    temperature: 0
  - name: safe
    kind: guard
    input: steps.answer
    block: ["@"]
"""


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="pairs (direct, pipeline)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    model_dir, _ = e2e.bench_model(True)
    data = e2e.bench_data("pipeline-bench")
    up = e2e.maas_up(model_dir, data)
    up.start()
    try:
        stack = await e2e.stack_when_up(up, data)
        (data / "bot.yaml").write_text(PIPELINE.replace("MAX_TOKENS", str(args.max_tokens)))
        pushed = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "maas", "pipeline", "push", "bot",
                                                          "bot.yaml"], cwd=data, capture_output=True, text=True,
                                         timeout=60)
        if pushed.returncode:
            raise RuntimeError(f"maas pipeline push failed: {pushed.stderr[-500:]}")
        from maas.mesh.clients import dial
        from maas.mesh.tls import TlsFiles
        from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc

        ca = stack.get("tls_ca", "")
        channel = dial(stack["router"], stack["api_key"], TlsFiles.load(ca=ca) if ca else None)
        stub = inference_pb2_grpc.InferenceStub(channel)
        params = common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=0)

        async def ttft(model: str, text: str) -> float:
            request = inference_pb2.GenerateRequest(model=model, messages=[inference_pb2.ChatMessage(
                role="user", content=text)])
            if model == "demo":
                request.params.CopyFrom(params)
            t0 = time.perf_counter()
            first = 0.0
            async for chunk in stub.GenerateStream(request, timeout=60):
                if chunk.text and not first:
                    first = time.perf_counter() - t0
            return first

        for i in range(10):  # warm-up: both paths, caches filled
            await ttft("demo", f"Question: warm {i}")
            await ttft("bot", f"warm {i}")
        direct, piped = [], []
        for i in range(args.requests):
            question = f"what does function number {i} return?"
            if i % 2:  # alternate which goes first
                piped.append(await ttft("bot", question))
                direct.append(await ttft("demo", f"Question: {question}"))
            else:
                direct.append(await ttft("demo", f"Question: {question}"))
                piped.append(await ttft("bot", question))
        await channel.close()
    finally:
        await asyncio.to_thread(up.stop, 90.0)
    overhead = [(p - d) * 1000 for p, d in zip(piped, direct, strict=True)]
    e2e.say(f"{args.requests} pairs, {args.max_tokens} tokens each, one request at a time, through gRPC")
    e2e.say(f"direct TTFT p50 {e2e.pct(direct, 0.5) * 1000:.2f} ms p99 {e2e.pct(direct, 0.99) * 1000:.2f} ms; "
            f"pipeline TTFT p50 {e2e.pct(piped, 0.5) * 1000:.2f} ms p99 {e2e.pct(piped, 0.99) * 1000:.2f} ms")
    print(f"pipeline_ttft_overhead_ms_p50={e2e.pct(overhead, 0.5):.2f} p99={e2e.pct(overhead, 0.99):.2f} "
          f"direct_ttft_ms_p50={e2e.pct(direct, 0.5) * 1000:.2f} pipeline_ttft_ms_p50={e2e.pct(piped, 0.5) * 1000:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
