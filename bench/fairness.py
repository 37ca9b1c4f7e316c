"""Benchmark: one tenant's flood against another tenant's time to first token (issue 14).

`maas up --model DIR --workers 1` (the forged demo model, the engine's defaults: 64 batch
slots, 64 queue places), two tenants with keys made by `maas keys create` (no limits, equal
weights), as issue 14 measured first come first served:

1. alone: the quiet tenant keeps `--quiet-streams` streams (2) going, one after another,
   `--samples` requests in all; TTFT at the client to the first chunk with tokens;
2. flooded: the same while the flooding tenant keeps `--flood` streams (64) open, each
   asking for `--flood-tokens` tokens and starting the next as soon as one ends (a refused
   one waits its Retry-After hint, as a client should). The flooding tenant is another
   client, so it runs in a process of its own (`--flood-in-process` puts its streams on the
   quiet client's event loop, where the quiet tenant's first tokens also wait behind the
   flood's chunks: how this bench measured before 2026-12-03).

3. batch against online, on the idle fleet: `--batch-lines` requests (completions of
   `--batch-tokens` tokens) sent once as a batch (`/v1/batches`, timed from its creation
   to its completion as a client polling every 0.1 s sees it), after 2 s without any
   online request (batches yield to online requests for a second after the last one),
   and once online by a client with as many requests in flight as the router runs batch
   lines (its default, 16); throughput is completion tokens per second of each;
4. interactive under a batch: a third tenant whose key has the `interactive` class runs
   the quiet phase alone, then again while a batch of `--batch-lines` * 4 longer requests
   runs (cancelled afterwards).

Everything online goes through the router's gRPC API over TLS; batches through the
OpenAI HTTP API (the official client). Last line:

  quiet_p99_ratio=<a> batch_vs_online_throughput=<b> interactive_p99_ratio_with_batch=<c>

a: the quiet tenant's TTFT p99 flooded over its p99 alone; b: batch tokens/s over online
tokens/s; c: the interactive tenant's TTFT p99 with the batch running over its p99 alone;
all in the same run. Goals (issue 14): a <= 1.5, b >= 0.8, c <= 1.2.

    python bench/fairness.py               # --samples 200 --flood 64 --batch-lines 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (the e2e bench's helpers)


def make_key(data: Path, tenant: str, *extra: str) -> str:
    made = subprocess.run([sys.executable, "-m", "maas", "keys", "create", "--tenant", tenant, "--json", *extra],
                          cwd=data, capture_output=True, text=True, timeout=60)
    if made.returncode:
        raise RuntimeError(f"maas keys create failed: {made.stderr[-500:]}")
    return str(json.loads(made.stdout.splitlines()[0])["key"])


async def flooding(stub: Any, i: int, args: argparse.Namespace, state: dict[str, int],
                   warmed: asyncio.Event) -> None:
    """One flooding stream: requests of `--flood-tokens` tokens one after another; a refused one
    waits its Retry-After hint, as a client should."""
    import grpc

    from maas.v1 import common_pb2, inference_pb2

    n = 0
    while True:
        n += 1
        request = inference_pb2.GenerateRequest(
            model="demo", prompt=f"import os\n# flood {i} {n}\n",
            params=common_pb2.SamplingParams(max_tokens=args.flood_tokens, temperature=0, ignore_eos=True))
        try:
            async for chunk in stub.GenerateStream(request, timeout=300):
                state["made"] += len(chunk.token_ids)
                state["chunks"] += 1
                if state["made"] >= args.flood * args.flood_tokens:
                    warmed.set()
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            state["refused"] += 1
            hint = dict(e.trailing_metadata() or ()).get("retry-after", "1")
            await asyncio.sleep(float(hint))


async def flood_client(router: str, key: str, ca: str, args: argparse.Namespace) -> int:
    """The flooding tenant as a client process of its own: prints "warm" once every stream was
    served about once, floods until its stdin closes, then prints "made refused chunks"
    counted after "warm", and the seconds since."""
    from maas.mesh.clients import dial
    from maas.mesh.tls import TlsFiles
    from maas.v1 import inference_pb2_grpc

    channel = dial(router, key, TlsFiles.load(ca=ca) if ca else None)
    stub = inference_pb2_grpc.InferenceStub(channel)
    state = {"made": 0, "refused": 0, "chunks": 0}
    warmed = asyncio.Event()
    tasks = [asyncio.create_task(flooding(stub, i, args, state, warmed)) for i in range(args.flood)]
    await warmed.wait()
    state.update(made=0, refused=0, chunks=0)
    print("warm", flush=True)
    since = time.perf_counter()
    await asyncio.to_thread(sys.stdin.read)  # until the bench closes it
    took = time.perf_counter() - since
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(state["made"], state["refused"], state["chunks"], f"{took:.3f}", flush=True)
    await channel.close()
    return 0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="quiet requests in each phase")
    parser.add_argument("--quiet-streams", type=int, default=2)
    parser.add_argument("--quiet-tokens", type=int, default=16)
    parser.add_argument("--flood", type=int, default=64, help="streams the flooding tenant keeps open")
    parser.add_argument("--flood-tokens", type=int, default=64)
    parser.add_argument("--batch-lines", type=int, default=128, help="requests of the throughput batch")
    parser.add_argument("--batch-tokens", type=int, default=32)
    parser.add_argument("--flood-in-process", action="store_true",
                        help="run the flooding tenant's streams in this process, on the quiet tenant's event loop "
                             "(the quiet client's first tokens then also queue behind the flood's chunks)")
    parser.add_argument("--online-concurrency", type=int, default=16,
                        help="requests in flight online (the router's --batch-concurrency default)")
    parser.add_argument("--no-batch", action="store_true", help="measure the flood only (steps 1-2)")
    parser.add_argument("--stream-interval-ms", type=int, default=0,
                        help="the model's engine option stream_interval_ms (0: every step's tokens sent at once)")
    parser.add_argument("--flood-client", nargs=3, metavar=("ROUTER", "KEY", "CA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_client:
        router, key, ca = args.flood_client
        return await flood_client(router, key, ca, args)
    model_dir, _ = e2e.bench_model(True)
    data = e2e.bench_data("fairness-bench")
    options = {"stream_interval_ms": str(args.stream_interval_ms)} if args.stream_interval_ms else {}
    up = e2e.maas_up(model_dir, data, options=options)
    up.start()
    try:
        stack = await e2e.stack_when_up(up, data)
        keys = {t: await asyncio.to_thread(make_key, data, t) for t in ("quiet", "flood", "batch")}
        keys["online"] = await asyncio.to_thread(make_key, data, "online", "--class", "interactive")

        from maas.mesh.clients import dial
        from maas.mesh.tls import TlsFiles
        from maas.v1 import common_pb2, inference_pb2, inference_pb2_grpc

        ca = stack.get("tls_ca", "")
        tls = TlsFiles.load(ca=ca) if ca else None
        channels = {t: dial(stack["router"], k, tls) for t, k in keys.items()}
        stubs = {t: inference_pb2_grpc.InferenceStub(c) for t, c in channels.items()}

        async def ttft(i: int, tenant: str) -> float:
            request = inference_pb2.GenerateRequest(model="demo", prompt=f"def quiet_{i}(a, b):",
                                                    params=common_pb2.SamplingParams(
                                                        max_tokens=args.quiet_tokens, temperature=0))
            t0 = time.perf_counter()
            first = 0.0
            async for chunk in stubs[tenant].GenerateStream(request, timeout=120):
                if chunk.token_ids and not first:
                    first = time.perf_counter() - t0
            return first

        async def quiet_phase(tenant: str = "quiet") -> list[float]:
            out: list[float] = []
            counter = iter(range(args.samples))

            async def stream() -> None:
                for i in counter:
                    out.append(await ttft(i, tenant))
            await asyncio.gather(*(stream() for _ in range(args.quiet_streams)))
            return out

        await quiet_phase()  # warm-up
        alone = await quiet_phase()
        if args.flood_in_process:
            flood_state = {"made": 0, "refused": 0, "chunks": 0}
            warmed = asyncio.Event()
            tasks = [asyncio.create_task(flooding(stubs["flood"], i, args, flood_state, warmed))
                     for i in range(args.flood)]
            try:
                await warmed.wait()
                for k in flood_state:
                    flood_state[k] = 0
                since = time.perf_counter()
                flooded = await quiet_phase()
                took = time.perf_counter() - since
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            made, refused, chunks = flood_state["made"], flood_state["refused"], flood_state["chunks"]
        else:
            # The flooding tenant is another client: its own process, as it would be.
            child = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--flood-client", stack["router"], keys["flood"], ca,
                "--flood", str(args.flood), "--flood-tokens", str(args.flood_tokens),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            assert child.stdin is not None and child.stdout is not None
            try:
                line = await child.stdout.readline()  # "warm" once every stream was served about once
                if line.strip() != b"warm":
                    raise RuntimeError(f"the flooding client failed: {line!r}")
                flooded = await quiet_phase()
            finally:
                child.stdin.close()  # the flooding client stops and reports
                out = await child.stdout.read()
                await child.wait()
            fields = out.split()
            if len(fields) != 4:
                raise RuntimeError(f"the flooding client ended with {out!r}")
            made, refused, chunks, took = int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3])
        if not args.no_batch:
            batch_tps, online_tps = await batch_against_online(stack, keys, args)
            online_alone = await quiet_phase("online")
            batch = await start_batch(stack, keys["batch"], args.batch_lines * 4, args.batch_tokens * 4, "busy")
            try:
                await wait_answered(batch, 2 * args.online_concurrency)
                with_batch = await quiet_phase("online")
                answered = (await batch[0].batches.retrieve(batch[1])).request_counts.completed
            finally:
                await batch[0].batches.cancel(batch[1])
        for c in channels.values():
            await c.close()
    finally:
        await asyncio.to_thread(up.stop, 90.0)

    def ms(values: list[float], q: float) -> float:
        return e2e.pct(values, q) * 1000

    e2e.say(f"quiet tenant, {args.quiet_streams} streams, {args.samples} requests of {args.quiet_tokens} tokens; "
            f"flood: {args.flood} streams of {args.flood_tokens} tokens, {refused} refusals while measured, "
            f"{made / max(chunks, 1):.2f} tokens a chunk, {made / max(took, 1e-9):.0f} tokens/s")
    e2e.say(f"quiet TTFT alone p50 {ms(alone, 0.5):.1f} ms p99 {ms(alone, 0.99):.1f} ms; "
            f"flooded p50 {ms(flooded, 0.5):.1f} ms p99 {ms(flooded, 0.99):.1f} ms")
    quiet = f"quiet_p99_ratio={e2e.pct(flooded, 0.99) / e2e.pct(alone, 0.99):.2f}"
    if args.no_batch:
        print(f"{quiet} batch_vs_online_throughput=not-run interactive_p99_ratio_with_batch=not-run")
        return 0
    e2e.say(f"{args.batch_lines} requests of {args.batch_tokens} tokens: batch {batch_tps:.0f} tokens/s, "
            f"online at {args.online_concurrency} in flight {online_tps:.0f} tokens/s")
    e2e.say(f"interactive TTFT alone p50 {ms(online_alone, 0.5):.1f} ms p99 {ms(online_alone, 0.99):.1f} ms; "
            f"with a batch running p50 {ms(with_batch, 0.5):.1f} ms p99 {ms(with_batch, 0.99):.1f} ms "
            f"({answered} batch lines answered by the end)")
    print(f"{quiet} "
          f"batch_vs_online_throughput={batch_tps / online_tps:.2f} "
          f"interactive_p99_ratio_with_batch={e2e.pct(with_batch, 0.99) / e2e.pct(online_alone, 0.99):.2f}")
    return 0


Batch = tuple[Any, str]  # (the openai client, the batch id)


def _client(stack: dict[str, Any], key: str) -> Any:
    import ssl

    import openai

    ca = stack.get("tls_ca", "")
    http = openai.DefaultAsyncHttpxClient(verify=ssl.create_default_context(cafile=ca)) if ca else None
    return openai.AsyncOpenAI(base_url=stack['http'], api_key=key, max_retries=0, http_client=http,
                              timeout=600)


def _requests(n: int, tokens: int, salt: str) -> list[dict[str, Any]]:
    return [{"model": "demo", "prompt": f"# {salt} {i}\ndef f_{i}(a, b):", "max_tokens": tokens,
             "temperature": 0, "ignore_eos": True} for i in range(n)]


async def start_batch(stack: dict[str, Any], key: str, n: int, tokens: int, salt: str) -> Batch:
    client = _client(stack, key)
    lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n"
                    for i, body in enumerate(_requests(n, tokens, salt)))
    f = await client.files.create(file=("bench.jsonl", lines.encode()), purpose="batch")
    batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    return client, batch.id


async def poll(batch: Batch, done: Callable[[Any], bool]) -> Any:
    """The batch once `done(batch)` holds, asked every 0.1 s (the way a client follows one)."""
    while True:
        got = await batch[0].batches.retrieve(batch[1])
        if done(got):
            return got
        await asyncio.sleep(0.1)


async def wait_answered(batch: Batch, at_least: int) -> None:
    await poll(batch, lambda b: b.request_counts.completed >= at_least)


async def batch_against_online(stack: dict[str, Any], keys: dict[str, str], args: argparse.Namespace
                               ) -> tuple[float, float]:
    """(batch tokens/s, online tokens/s) of the same requests on the idle fleet."""
    client = _client(stack, keys["batch"])
    requests = _requests(args.batch_lines, args.batch_tokens, "online")
    pending = iter(requests)
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        for body in pending:
            extra = {"ignore_eos": body["ignore_eos"]}
            reply = await client.completions.create(**{k: v for k, v in body.items() if k not in extra},
                                                    extra_body=extra)
            tokens += reply.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.online_concurrency)))
    online = tokens / (time.perf_counter() - t0)

    await asyncio.sleep(2.0)  # the fleet idle: batches yield to online requests for a second after the last
    t0 = time.perf_counter()
    batch = await start_batch(stack, keys["batch"], args.batch_lines, args.batch_tokens, "batch")
    got = await poll(batch, lambda b: b.status in ("completed", "failed", "cancelled"))
    took = time.perf_counter() - t0
    if got.status != "completed" or got.request_counts.failed:
        raise RuntimeError(f"the throughput batch ended {got.status} with {got.request_counts.failed} failed lines")
    content = await client.files.content(got.output_file_id)
    made = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in content.text.splitlines())
    return made / took, online


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
