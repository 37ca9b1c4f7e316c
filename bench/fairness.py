"""Benchmark: one tenant's flood against another tenant's time to first token (issue 14).

`maas up --model DIR --workers 1` (the forged demo model, the engine's defaults: 64 batch
slots, 64 queue places), two tenants with keys made by `maas keys create` (no limits, equal
weights), as issue 14 measured first come first served:

1. alone: the quiet tenant keeps `--quiet-streams` streams (2) going, one after another,
   `--samples` requests in all; TTFT at the client to the first chunk with tokens;
2. flooded: the same while the flooding tenant keeps `--flood` streams (64) open, each
   asking for `--flood-tokens` tokens and starting the next as soon as one ends (a refused
   one waits its Retry-After hint, as a client should).

Everything goes through the router's gRPC API over TLS. Last line:

  quiet_p99_ratio=<a> batch_vs_online_throughput=not-built interactive_p99_ratio_with_batch=not-built

a: the quiet tenant's TTFT p99 flooded over its p99 alone, in the same run. Goal (issue
14): a <= 1.5. The other two figures wait for the batch API and priority classes.

    python bench/fairness.py               # --samples 200 --flood 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (the e2e bench's helpers)


def make_key(data: Path, tenant: str) -> str:
    made = subprocess.run([sys.executable, "-m", "maas", "keys", "create", "--tenant", tenant, "--json"],
                          cwd=data, capture_output=True, text=True, timeout=60)
    if made.returncode:
        raise RuntimeError(f"maas keys create failed: {made.stderr[-500:]}")
    return str(json.loads(made.stdout.splitlines()[0])["key"])


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="quiet requests in each phase")
    parser.add_argument("--quiet-streams", type=int, default=2)
    parser.add_argument("--quiet-tokens", type=int, default=16)
    parser.add_argument("--flood", type=int, default=64, help="streams the flooding tenant keeps open")
    parser.add_argument("--flood-tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir, _ = e2e.bench_model(True)
    data = e2e.bench_data("fairness-bench")
    up = e2e.maas_up(model_dir, data)
    up.start()
    try:
        stack = await e2e.stack_when_up(up, data)
        keys = {t: await asyncio.to_thread(make_key, data, t) for t in ("quiet", "flood")}
        import grpc

        from maas.mesh.clients import dial
        from maas.mesh.tls import TlsFiles
        from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc

        ca = stack.get("tls_ca", "")
        tls = TlsFiles.load(ca=ca) if ca else None
        channels = {t: dial(stack["router"], k, tls) for t, k in keys.items()}
        stubs = {t: inference_pb2_grpc.InferenceStub(c) for t, c in channels.items()}

        async def ttft(i: int) -> float:
            request = inference_pb2.GenerateRequest(model="demo", prompt=f"def quiet_{i}(a, b):",
                                                    params=common_pb2.SamplingParams(
                                                        max_tokens=args.quiet_tokens, temperature=0))
            t0 = time.perf_counter()
            first = 0.0
            async for chunk in stubs["quiet"].GenerateStream(request, timeout=120):
                if chunk.token_ids and not first:
                    first = time.perf_counter() - t0
            return first

        async def quiet_phase() -> list[float]:
            out: list[float] = []
            counter = iter(range(args.samples))

            async def stream() -> None:
                for i in counter:
                    out.append(await ttft(i))
            await asyncio.gather(*(stream() for _ in range(args.quiet_streams)))
            return out

        made = refused = chunks = 0
        warmed = asyncio.Event()  # every flooding stream has been served about once

        async def flooding(i: int) -> None:
            nonlocal made, refused, chunks
            n = 0
            while True:
                n += 1
                request = inference_pb2.GenerateRequest(
                    model="demo", prompt=f"import os\n# flood {i} {n}\n",
                    params=common_pb2.SamplingParams(max_tokens=args.flood_tokens, temperature=0, ignore_eos=True))
                try:
                    async for chunk in stubs["flood"].GenerateStream(request, timeout=300):
                        made += len(chunk.token_ids)
                        chunks += 1
                        if made >= args.flood * args.flood_tokens:
                            warmed.set()
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    refused += 1
                    hint = dict(e.trailing_metadata() or ()).get("retry-after", "1")
                    await asyncio.sleep(float(hint))

        await quiet_phase()  # warm-up
        alone = await quiet_phase()
        flood = [asyncio.create_task(flooding(i)) for i in range(args.flood)]
        try:
            await warmed.wait()
            flooded = await quiet_phase()
        finally:
            for t in flood:
                t.cancel()
            await asyncio.gather(*flood, return_exceptions=True)
        for c in channels.values():
            await c.close()
    finally:
        await asyncio.to_thread(up.stop, 90.0)

    def ms(values: list[float], q: float) -> float:
        return e2e.pct(values, q) * 1000

    e2e.say(f"quiet tenant, {args.quiet_streams} streams, {args.samples} requests of {args.quiet_tokens} tokens; "
            f"flood: {args.flood} streams of {args.flood_tokens} tokens, {refused} refusals while measured, "
            f"{made / max(chunks, 1):.2f} tokens a chunk")
    e2e.say(f"quiet TTFT alone p50 {ms(alone, 0.5):.1f} ms p99 {ms(alone, 0.99):.1f} ms; "
            f"flooded p50 {ms(flooded, 0.5):.1f} ms p99 {ms(flooded, 0.99):.1f} ms")
    print(f"quiet_p99_ratio={e2e.pct(flooded, 0.99) / e2e.pct(alone, 0.99):.2f} "
          "batch_vs_online_throughput=not-built interactive_p99_ratio_with_batch=not-built")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
