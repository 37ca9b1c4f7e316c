"""Benchmark: overload stays graceful (issue 12, item 5).

`maas up --model DIR --workers 1` (the forged demo model), then a second deployment of the
same model with a small engine (`max_batch` --slots, `max_queue` the same, the default),
driven through the router's gRPC API with greedy streams of --max-tokens tokens:

  at capacity   --slots concurrent closed loops: every request admitted; the baseline
  overloaded    4 x --slots concurrent closed loops: some admitted, the rest refused
  (and 8 x, printed only: the admitted requests' TTFT should not grow with the overload)

For the overloaded level it prints how many were refused, how long a refusal took (from
sending the request to the RESOURCE_EXHAUSTED status) and the retry hints given, and the
admitted requests' time to first token, next to the at-capacity level's, measured in the
same run. Last line:

  overload_refusal_ms_p50=<a> overload_refusal_ms_p99=<b> admitted_ttft_p99_ms=<c>
  at_capacity_ttft_p99_ms=<d> admitted_vs_capacity_ttft_p99=<e> refused_share=<f>

Goals (issue 12): refusals within 100 ms, and admitted TTFT bounded (a small multiple of
the at-capacity figure, not growing with the overload).

    python bench/overload.py                    # --slots 8 --seconds 20 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (the e2e bench's helpers: model, ports, servers, percentiles)


async def level(stub: object, model: str, concurrency: int, seconds: float, max_tokens: int) -> dict[str, object]:
    import grpc

    from maas.v1 import common_pb2, inference_pb2

    ttfts: list[float] = []
    refusals: list[float] = []
    hints: list[str] = []
    errors: list[str] = []
    done = 0
    end = time.perf_counter() + seconds
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def loop(i: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < end:
            n += 1
            request = inference_pb2.GenerateRequest(model=model, prompt=f"def f{i}_{n}(x):", params=params)
            t0 = time.perf_counter()
            first = 0.0
            try:
                async for chunk in stub.GenerateStream(request, timeout=120):  # type: ignore[attr-defined]
                    if not first and chunk.text:
                        first = time.perf_counter() - t0
                ttfts.append(first)
                done += 1
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refusals.append(time.perf_counter() - t0)
                    hints.append(dict(e.trailing_metadata() or ()).get("retry-after", "-"))
                    await asyncio.sleep(0.05)  # a client that retries soon (ignoring the hint, to keep the pressure)
                else:
                    errors.append(f"{e.code().name}: {e.details()}")

    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    return {"concurrency": concurrency, "completed": done, "refused": len(refusals), "ttfts": ttfts,
            "refusals": refusals, "hints": sorted(set(hints)), "errors": errors}


def ms(values: list[float], q: float) -> float:
    return e2e.pct(values, q) * 1000 if values else float("nan")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=8, help="the engine's max_batch (and max_queue)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each level")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    model_dir, _ = e2e.bench_model(True)
    data = e2e.bench_data("overload")
    up = e2e.maas_up(model_dir, data)
    up.start()
    try:
        stack = await e2e.stack_when_up(up, data)
        maas = [sys.executable, "-m", "maas"]
        env = dict(os.environ)  # the CLI finds the stack (and its admin credentials) from .maas in its cwd
        for cmd in (["models", "register", "small", "--source", str(model_dir),
                     "--option", f"max_batch={args.slots}", "--option", f"max_queue={args.slots}"],
                    ["deploy", "create", "small", "--replicas", "1"]):
            result = await asyncio.to_thread(subprocess.run, [*maas, *cmd], cwd=data, env=env, capture_output=True,
                                             text=True, timeout=60)
            if result.returncode:
                raise RuntimeError(f"maas {' '.join(cmd)} failed: {result.stderr[-500:]}")
        from maas.mesh.clients import dial
        from maas.mesh.tls import TlsFiles
        from maas.v1 import inference_pb2_grpc

        ca = stack.get("tls_ca", "")
        channel = dial(stack["router"], stack["api_key"], TlsFiles.load(ca=ca) if ca else None)
        stub = inference_pb2_grpc.InferenceStub(channel)
        ready = time.monotonic() + 120
        while True:  # until the small deployment answers
            probe = await level(stub, "small", 1, 0.01, 2)
            if probe["completed"]:
                break
            if time.monotonic() > ready:
                raise RuntimeError(f"deployment small never answered: {probe['errors'][:1]}")
            await asyncio.sleep(1)
        e2e.say(f"model: the forged demo model; engine max_batch {args.slots}, max_queue {args.slots}; "
                f"{args.max_tokens} tokens per request; {args.seconds:.0f} s per level")
        results = {}
        for name, concurrency in (("at capacity", args.slots), ("overloaded", 4 * args.slots),
                                  ("overloaded x8", 8 * args.slots)):
            r = await level(stub, "small", concurrency, args.seconds, args.max_tokens)
            results[name] = r
            e2e.say(f"{name:<13} {concurrency:>3} concurrent: {r['completed']} completed, {r['refused']} refused; "
                    f"TTFT p50 {ms(r['ttfts'], 0.5):.1f} ms p99 {ms(r['ttfts'], 0.99):.1f} ms; "
                    f"refusal p50 {ms(r['refusals'], 0.5):.1f} ms p99 {ms(r['refusals'], 0.99):.1f} ms; "
                    f"retry-after {', '.join(r['hints']) or '-'}"
                    f"{'; errors: ' + str(r['errors'][:2]) if r['errors'] else ''}")
        await channel.close()
    finally:
        await asyncio.to_thread(up.stop, 90.0)
    cap, over = results["at capacity"], results["overloaded"]
    total = over["completed"] + over["refused"]
    ratio = ms(over["ttfts"], 0.99) / ms(cap["ttfts"], 0.99) if cap["ttfts"] else float("nan")
    print(f"overload_refusal_ms_p50={ms(over['refusals'], 0.5):.1f} "
          f"overload_refusal_ms_p99={ms(over['refusals'], 0.99):.1f} "
          f"admitted_ttft_p99_ms={ms(over['ttfts'], 0.99):.1f} at_capacity_ttft_p99_ms={ms(cap['ttfts'], 0.99):.1f} "
          f"admitted_vs_capacity_ttft_p99={ratio:.2f} refused_share={over['refused'] / total if total else 0:.2f}")
    return 0 if over["ttfts"] and cap["ttfts"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
